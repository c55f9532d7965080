"""The local SeaweedFS S3 server behaves like S3 for every client the cache uses.

Run alone: python -m pytest -q -p tests.conftest_s3 tests/test_s3_server.py
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs

pytestmark = pytest.mark.s3

TABLE = pa.table({"id": pa.array([1, 2, 3], pa.int64()), "text": ["a", "b", "c"]})


def _key(s3, name: str) -> str:
    # A fresh prefix per test: the server lives for the whole session.
    return f"{s3.bucket}/test-s3-server/{uuid.uuid4().hex[:8]}/{name}"


def _s3fs(s3) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())


def test_pyarrow_s3_parquet_roundtrip(s3):
    fs = pafs.S3FileSystem(
        endpoint_override=s3.endpoint_url.removeprefix("http://"), scheme="http",
        access_key=s3.access_key, secret_key=s3.secret_key, region=s3.region,
    )
    path = _key(s3, "arrow.parquet")
    pq.write_table(TABLE, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(TABLE)


def test_s3fs_parquet_roundtrip(s3):
    fs = _s3fs(s3)
    path = _key(s3, "s3fs.parquet")
    with fs.open(path, "wb") as f:
        pq.write_table(TABLE, f)
    with fs.open(path, "rb") as f:
        assert pq.read_table(f).equals(TABLE)
    assert fs.info(path)["size"] > 0


def test_fsspec_open_uses_env_only(s3, monkeypatch):
    # No storage options at all: endpoint and keys come from the AWS_* variables the fixture set.
    url = f"s3://{_key(s3, 'env.parquet')}"
    with fsspec.open(url, "wb", skip_instance_cache=True) as f:
        pq.write_table(TABLE, f)
    with fsspec.open(url, "rb", skip_instance_cache=True) as f:
        assert pq.read_table(f).equals(TABLE)


def test_single_put_replaces_object_atomically(s3):
    """The cache's commit primitive: readers see the old object or the new one, never a mix."""
    fs = _s3fs(s3)
    path = _key(s3, "manifest.bin")
    size = 6 * 2**20  # above weed's 4 MB chunk size, so the object spans several chunks
    versions = [bytes([c]) * size for c in b"AB"]
    fs.pipe_file(path, versions[0])
    assert fs.cat_file(path) == versions[0]
    fs.pipe_file(path, versions[1])
    assert fs.cat_file(path) == versions[1]

    torn, done = [], threading.Event()

    def read_loop():
        reader = _s3fs(s3)
        while not done.is_set():
            data = reader.cat_file(path)
            if data not in versions:
                torn.append((len(data), data[:1], data[-1:]))

    t = threading.Thread(target=read_loop)
    t.start()
    try:
        for i in range(10):
            fs.pipe_file(path, versions[i % 2])
    finally:
        done.set()
        t.join(timeout=60)
    assert not torn, f"reader saw a partly replaced object: {torn[:3]}"


def _put(fs, path: str, body: bytes, **cond) -> str | None:
    """One conditional PUT straight through botocore: the new ETag, or None if a precondition refused it."""
    bucket, key, _ = fs.split_path(path)
    try:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **cond)["ETag"]
    except OSError as e:  # s3fs turns the 412 into an OSError; the botocore error is its cause
        if getattr(e.__cause__, "response", {}).get("Error", {}).get("Code") == "PreconditionFailed":
            return None
        raise


def test_conditional_writes_the_lock_relies_on(s3):
    """The writer lock and the manifest commit are compare-and-swaps: `If-None-Match: *` creates only an
    absent key, `If-Match: <etag>` replaces only that version, and of racing writers exactly one wins."""
    fs = _s3fs(s3)
    path = _key(s3, "lock")
    first = _put(fs, path, b"first", IfNoneMatch="*")
    assert first is not None
    assert _put(fs, path, b"second", IfNoneMatch="*") is None  # create refused on an existing key
    assert fs.cat_file(path) == b"first"

    assert _put(fs, path, b"third", IfMatch='"0123456789abcdef0123456789abcdef"') is None  # wrong version
    assert fs.cat_file(path) == b"first"
    third = _put(fs, path, b"third", IfMatch=first)  # the right one
    assert third not in (None, first) and fs.cat_file(path) == b"third"
    assert _put(fs, path, b"fourth", IfMatch=first) is None  # a version once replaced is gone for good

    n = 8
    race = _key(s3, "race")
    with ThreadPoolExecutor(n) as pool:
        created = list(pool.map(lambda i: _put(_s3fs(s3), race, f"creator {i}".encode(), IfNoneMatch="*"), range(n)))
    winners = [i for i, etag in enumerate(created) if etag]
    assert len(winners) == 1, f"{len(winners)} of {n} racing creators succeeded"
    assert fs.cat_file(race) == f"creator {winners[0]}".encode()

    base = created[winners[0]]
    with ThreadPoolExecutor(n) as pool:
        replaced = list(pool.map(lambda i: _put(_s3fs(s3), race, f"replacer {i}".encode(), IfMatch=base), range(n)))
    winners = [i for i, etag in enumerate(replaced) if etag]
    assert len(winners) == 1, f"{len(winners)} of {n} racing replacers of one version succeeded"
    assert fs.cat_file(race) == f"replacer {winners[0]}".encode()
