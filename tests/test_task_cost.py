"""A task costs what the task needs: in a cache of 20 shards, training one task reads only the shard that holds
it, an incremental ingest of new texts reads no hidden state at all, and each command opens the cache once.

Each case runs `er` in a subprocess with its own local Ray, and with tests/io_probe on PYTHONPATH: every Python
process of the run (driver, Ray Data tasks, Train workers) logs the files it opens for reading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from er_core import Recycler, ingest_local, load_task, open_cache
from er_core.tasks import example_input
from tests.conftest import WORDS, write_tiny_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big_cache(tiny_bert, tmp_path_factory):
    """(cache url, task folder, task shard): the task in one shard, then 19 shards of other texts."""
    import random

    base = tmp_path_factory.mktemp("task-cost")
    folder = write_tiny_task(base / "task", sizes=(("train", 64), ("dev", 16), ("test", 16)))
    rec = Recycler.load(tiny_bert, layer=2, codec="fp32")
    url = str(base / "cache")
    task = load_task(folder)
    ingest_local((example_input(e) for exs in task.splits.values() for e in exs), url, rec, progress=False)
    task_shard = open_cache(url).shards()[0].path
    rnd = random.Random(1)
    for s in range(19):
        texts = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 12))) + f" filler{s}x{i}" for i in range(24)]
        ingest_local(({"text": t} for t in texts), url, rec, progress=False)
    assert len(open_cache(url).shards()) == 20
    return url, folder, task_shard


def _run(args: list[str], tmp_path: Path, ray_tmp: Path) -> list[str]:
    """Run `er ARGS`; return the paths every process of the run opened for reading."""
    log = tmp_path / "reads.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}/tests/io_probe{os.pathsep}{ROOT}", "ER_TEST_READ_LOG": str(log),
           "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def _shards_read(reads: list[str], url: str) -> set[str]:
    return {p[len(url) + 1:] for p in reads if p.startswith(f"{url}/shards/")}


def _log_reads(log: Path, url: str) -> list[tuple[int, str]]:
    """(pid, file) of every read of the cache's commit log, in every process of the run."""
    out = []
    for line in log.read_text().splitlines():
        pid, path = line.split(" ", 1)
        if path.startswith(f"{url}/_log/"):
            out.append((int(pid), path[len(url) + 6:]))
    return out


def _one_open(url: str) -> list[str]:
    """The files one open of the cache reads: the checkpoint pointer, the checkpoint, the commits after it, and the
    absent next commit that ends the scan."""
    import fsspec

    from er_core.store import log as commit_log

    read = []
    state = commit_log.read_state(*fsspec.core.url_to_fs(url), url, counter=read.append)
    return [p[len("_log/"):] for p in read] + [commit_log.commit_path(state.generation + 1)[len("_log/"):]]


def test_training_reads_only_the_shard_holding_the_task_and_opens_the_cache_once(big_cache, tmp_path, ray_tmp):
    url, folder, task_shard = big_cache
    reads = _run(["train", "--cache", url, "--task", str(folder), "--out", str(tmp_path / "out"), "--workers", "1",
                  "--epochs", "2", "--cpus-per-worker", "0.5"], tmp_path, ray_tmp)
    assert _shards_read(reads, url) == {task_shard}
    opened = _log_reads(tmp_path / "reads.log", url)
    assert len({pid for pid, _ in opened}) == 1  # the driver's: workers and read tasks get located rows
    assert sorted(f for _, f in opened) == sorted(_one_open(url))  # one open: README's count
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "test" in metrics


def test_incremental_ingest_reads_no_hidden_state(big_cache, tiny_bert, tmp_path, ray_tmp):
    url, _, _ = big_cache
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"a new sentence number {i} about {WORDS[i]}"}) + "\n" for i in range(10)))
    before = open_cache(url).manifest.totals["rows"]
    reads = _run(["ingest", str(corpus), "--cache", url, "--model", tiny_bert, "--layer", "2", "--codec", "fp32"],
                 tmp_path, ray_tmp)
    assert any(p.startswith(f"{url}/index/") for p in reads)  # the probe sees the run's reads
    assert _shards_read(reads, url) == set()
    assert open_cache(url).manifest.totals["rows"] == before + 10


def test_a_sweep_of_three_trials_opens_the_cache_once(big_cache, tmp_path, ray_tmp):
    import yaml

    url, folder, _ = big_cache
    sweep = {"cache": url, "output": str(tmp_path / "runs"), "tasks": [str(folder)], "methods": ["reduced"],
             "grid": {"lr": [1.0e-3, 2.0e-3, 3.0e-3]}, "max_concurrent": 1,
             "defaults": {"epochs": 1, "batch_size": 32}, "resources": {"cpus_per_worker": 0.5}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    _run(["sweep", str(tmp_path / "sweep.yaml")], tmp_path, ray_tmp)
    assert len(json.loads((tmp_path / "runs" / "results.json").read_text())) == 3
    opened = _log_reads(tmp_path / "reads.log", url)
    assert len({pid for pid, _ in opened}) == 1  # the sweep's driver: trials get its version
    assert sorted(f for _, f in opened) == sorted(_one_open(url))
