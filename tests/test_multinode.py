"""`er ingest` on local multi-node Ray clusters (tests/conftest_cluster.py): sized from the cluster, never hanging.

Each test runs `er ingest --address` in a subprocess against the cluster of its layout, shared with the other
tests of that layout, as a user would. The cache is a local path: every node is on this host, so all see it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from er_core import open_cache
from tests.conftest import write_tiny_task
from tests.conftest_cluster import CPU_HEAD, ZERO_CPU_HEAD

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 128  # 96 + 16 + 16, all distinct


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("multinode") / "task", sizes=(("train", 96), ("dev", 16), ("test", 16)))


def _ingest(cluster, model, corpus, cache, *extra, timeout=300) -> tuple[int, str, str, int]:
    """Run `er ingest` against the cluster; (exit status, stdout, stderr, driver pid)."""
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", str(corpus), "--cache", str(cache), "--model", model,
           "--layer", "2", "--codec", "fp32", "--shard-rows", "16", "--address", cluster.address, *extra]
    proc = subprocess.Popen(cmd, env={**cluster.env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a hang is the bug: end the driver, the cluster stays
        out, err = proc.communicate()
        pytest.fail(f"er ingest still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err, proc.pid


@pytest.mark.parametrize("ray_cluster", [CPU_HEAD], indirect=True, ids=str)
def test_default_ingest_spreads_actors_over_head_and_worker(ray_cluster, tiny_bert, task, tmp_path):
    code, out, err, pid = _ingest(ray_cluster, tiny_bert, task, tmp_path / "cache")
    assert code == 0, err[-3000:]
    assert f"examples written  {EXAMPLES}" in out
    assert "size=3" in err  # 2 + 2 CPUs: one actor per CPU but one, left to read with
    assert sorted(set(ray_cluster.actor_nodes(pid, "TokenizeEmbedWrite"))) == ["head", "w1"]
    assert open_cache(str(tmp_path / "cache")).verify() == []


@pytest.mark.parametrize("ray_cluster", [CPU_HEAD], indirect=True, ids=str)
def test_a_request_that_can_never_fit_fails_at_once(ray_cluster, tiny_bert, task, tmp_path):
    t0 = time.monotonic()
    code, _, err, _ = _ingest(ray_cluster, tiny_bert, task, tmp_path / "cache", "--actors", "8", timeout=120)
    assert time.monotonic() - t0 < 60  # Python and torch start-up included
    assert code == 2
    assert "er ingest: error: --actors 8 needs 9 CPUs (one per actor and one to read with), but the Ray cluster has 4" in err
    assert "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # refused before the cache is touched


@pytest.mark.parametrize("ray_cluster", [ZERO_CPU_HEAD], indirect=True, ids=str)
def test_zero_cpu_head_reads_local_files_on_the_driver_node(ray_cluster, tiny_bert, task, tmp_path):
    # The driver joins the head, which has no CPU: local files are read there by 0-CPU tasks, actors run on w1.
    code, out, err, pid = _ingest(ray_cluster, tiny_bert, task, tmp_path / "cache")
    assert code == 0, err[-3000:]
    assert f"examples written  {EXAMPLES}" in out
    assert ray_cluster.actor_nodes(pid, "TokenizeEmbedWrite") == ["w1"]
    assert f"/{EXAMPLES} [" in err and "Running Dataset" not in err  # er's own bar during the wait, not Ray Data's
    assert open_cache(str(tmp_path / "cache")).verify() == []
