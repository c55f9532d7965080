"""pytest plugin: one SeaweedFS S3 server for the whole session, as the `s3` fixture.

Load it with `pytest_plugins = ["tests.conftest_s3"]` in tests/conftest.py (or `-p tests.conftest_s3`).
While the session runs, the AWS_* variables point at the server, so code that only reads the
environment (s3fs, fsspec, pyarrow, er_core.store.storage) reaches it with no extra arguments.
"""

from __future__ import annotations

import shutil

import pytest

from tests.s3_server import SeaweedS3


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A running SeaweedS3 with bucket `s3.bucket` made; see tests/s3_server.py for its API."""
    base = tmp_path_factory.mktemp("seaweedfs")
    with pytest.MonkeyPatch.context() as mp:
        # A developer's own AWS profile or session token must not leak into the signed requests.
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        with SeaweedS3(base) as server:
            for name, value in server.env().items():
                mp.setenv(name, value)
            yield server
    shutil.rmtree(base, ignore_errors=True)  # data is worthless once the server is gone


def pytest_collection_modifyitems(items):
    # Any test that uses the fixture is an `s3` test, so `-m "not s3"` skips the server.
    for item in items:
        if "s3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
