"""pytest plugin: one local Ray for the whole session, as the `ray_session` fixture.

`ray.init` costs ~5 s, so every Ray-level test shares this one. It declares 8 logical CPUs on
purpose (more than this machine's cores): actors and Train workers hold a CPU for a whole run,
and Ray Data must always find one left to read with. Tests that need another cluster shape
(logical GPUs) start their own Ray in a subprocess instead of touching this one.

It starts after the `s3` fixture has set the AWS variables: er forwards no credentials to Ray
workers, which get them, as on any local Ray, from the environment they inherit.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session(s3):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # As on the local Ray er starts (pipelines.ray_env): no PreemptionWatcher process per Train run on one machine.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=1_000_000_000, log_to_driver=True)
    yield ray
    if started:
        ray.shutdown()


def pytest_collection_modifyitems(items):
    # Any test that uses the fixture is a `ray` test, so `-m "not ray"` runs without Ray.
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def ray_tmp():
    """A private RAY_TMPDIR for `er` subprocesses that start their own Ray; short, since Ray puts unix sockets
    under it (108-byte limit). On teardown, whatever of its sessions still runs is killed and the folder removed."""
    import glob
    import shutil
    import tempfile
    from pathlib import Path

    from pipelines.ray_sessions import session_processes

    folder = tempfile.mkdtemp(prefix="er-", dir="/tmp")
    yield Path(folder)
    for session in glob.glob(f"{folder}/ray/session_2*"):
        for p in session_processes(session):
            p.kill()
    shutil.rmtree(folder, ignore_errors=True)


def actors_of(class_name: str) -> list:
    """The actors this Ray session has had (dead ones too: the GCS actor table) whose class name holds `class_name`."""
    from ray._private.state import state  # this driver's view of the GCS

    return [a for a in state.actor_table(None).values() if class_name in a["ActorClassName"]]


def session_processes(ray, marker: str) -> list:
    """Worker processes of this Ray session whose command line holds `marker` (e.g. RayTrainWorker), and no
    one else's: another Ray may run on the machine (a second test run, a user's own)."""
    import psutil

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    return [p for p in raylet.children(recursive=True) if marker in " ".join(p.cmdline())]
