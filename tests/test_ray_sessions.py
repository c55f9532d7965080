"""No Ray process that er starts outlives it: after a normal exit, SIGTERM or SIGINT of the driver, and
after `kill -9` of the driver once `er cleanup` (which every er command also does first) has run.

Each case runs `er ingest` in a subprocess with its own local Ray under a private RAY_TMPDIR, and
counts the processes of that Ray session (its dir in their command line, or a file open under it).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines.ray_sessions import reap, record, session_processes
from tests.test_ingest import _er_ingest, _jsonl, _texts

ROOT = Path(__file__).resolve().parents[1]


def _env(ray_tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    return env


def _left(session: str, within: float = 5.0) -> list[str]:
    """The session's processes still alive after `within` seconds (empty as soon as none is)."""
    deadline = time.monotonic() + within
    while True:
        procs = session_processes(session)
        if not procs or time.monotonic() > deadline:
            return [f"{p.pid} {' '.join(p.info['cmdline'] or ())[:80]}" for p in procs if p.is_running()]
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT", "SIGKILL"])
def test_no_ray_process_outlives_er(how, tiny_bert, tmp_path, ray_tmp):
    n = 320 if how == "exit" else 4000  # big enough to be mid-run when the signal comes
    corpus = _jsonl(tmp_path / "c.jsonl", _texts(n, seed=4, longest=40))
    cache = tmp_path / "cache"
    log = open(tmp_path / "er.log", "w")
    cmd = _er_ingest(corpus, cache, tiny_bert, "--shard-rows", "16", "--commit-every", "1", "--actors", "1", "--threads", "1")
    proc = subprocess.Popen(cmd, env=_env(ray_tmp), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (cache / "_log" / "00000000000000000001.json").exists():  # the actors run: every kind of Ray process is up
            assert proc.poll() is None, (tmp_path / "er.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no commit within 300 s"
            time.sleep(0.1)
        (session,) = glob.glob(f"{ray_tmp}/ray/session_2*")
        names = " ".join(" ".join(p.info["cmdline"] or ()) for p in session_processes(session))
        for name in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert name in names, f"{name} not found among the session's processes: the count below would prove nothing"
        if how == "exit":
            assert proc.wait(timeout=300) == 0, (tmp_path / "er.log").read_text()[-3000:]
            console = (tmp_path / "er.log").read_text()
            assert "ingest: 100%" in console and f"{n}/{n} [" in console, console[-3000:]  # er's own bar
            assert "Running Dataset" not in console and "(raylet)" not in console, console[-3000:]  # nothing of Ray Data's
            # In a log, er's bar redraws only around er's own commit lines (pipelines.bars), not per shard.
            frames = re.findall(r"(?:^|\r)ingest:", console, flags=re.M)
            assert len(frames) <= console.count("committed generation") + 3, console[-3000:]
        else:
            assert proc.poll() is None, "the run finished before the signal; use a bigger corpus"
            os.kill(proc.pid, getattr(signal, how))  # the driver only, as a user or a scheduler would
            code = proc.wait(timeout=120)
            assert code == {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9}[how], (tmp_path / "er.log").read_text()[-3000:]
        if how == "SIGKILL":
            out = subprocess.run([sys.executable, "-m", "pipelines.cli", "cleanup"], env=_env(ray_tmp), cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "1 leftover Ray session(s) cleaned" in out.stdout, out.stdout + out.stderr
        assert _left(session) == []
        assert not glob.glob(f"{ray_tmp}/ray/er-sessions/*.json")  # its record went with it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _sleeper(tmp_path: Path, session: Path) -> subprocess.Popen:
    """A stand-in for a renamed Ray agent: holds a log file of `session` open; its command line does not name it."""
    (session / "logs").mkdir(parents=True)
    env = {**os.environ, "LOG": str(session / "logs" / "agent.out")}
    p = subprocess.Popen([sys.executable, "-c", "import os, time; f = open(os.environ['LOG'], 'a'); time.sleep(120)"], env=env)
    deadline = time.monotonic() + 30
    while not session_processes(str(session)):
        assert time.monotonic() < deadline, "the stand-in never opened its log"
        time.sleep(0.05)
    return p


def test_reap_stops_only_recorded_sessions_whose_driver_is_gone(tmp_path):
    root = tmp_path / "ray"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_info = {"pid": dead.pid, "started": psutil.Process(dead.pid).create_time()}
    dead.wait()
    agents = {name: _sleeper(tmp_path, root / f"session_{name}") for name in ("dead", "alive", "unrecorded")}
    try:
        record(str(root), str(root / "session_alive"))  # this process is its driver, alive
        rec = root / "er-sessions" / "dead.json"
        rec.write_text(json.dumps({**dead_info, "host": socket.gethostname(), "session_dir": str(root / "session_dead")}))

        cleaned = reap(str(root))
        assert [c["pid"] for c in cleaned] == [dead_info["pid"]] and cleaned[0]["processes"] == 1
        assert agents["dead"].wait(timeout=10) is not None and not rec.exists()
        assert agents["alive"].poll() is None and agents["unrecorded"].poll() is None
        assert reap(str(root)) == []
    finally:
        for p in agents.values():
            p.kill()
            p.wait()


def test_leaving_a_streamed_dataset_early_leaves_no_ray_data_thread_running(ray_session):
    """An interrupted run leaves the loop over Ray Data's rows early. Ray Data's iteration threads must be gone before
    Ray shuts down: one still unwinding then calls into Ray's core worker, which ends the process with status 1."""
    import threading

    from pipelines.ray_env import streamed

    def slow(batch):
        time.sleep(0.05)
        return batch

    ds = ray_session.data.range(400, override_num_blocks=40).map_batches(slow, batch_size=10)
    with pytest.raises(KeyboardInterrupt):
        with streamed(ds.iter_rows()) as rows:
            for i, _ in enumerate(rows):
                if i == 25:
                    raise KeyboardInterrupt  # as a signal handler would, mid-loop
    assert [t.name for t in threading.enumerate() if t.name == "iter_threaded"] == []
