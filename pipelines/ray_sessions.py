"""No local Ray that er starts outlives it.

Ray's DashboardAgent and RuntimeEnvAgent survive a `kill -9` of the driver that started them. So er
records each local Ray session it starts (driver pid, start time, session dir) in
RAY_TEMP/er-sessions/ (RAY_TEMP: $RAY_TMPDIR/ray, else /tmp/ray); at a normal exit the driver stops
its own session and drops the record, and every `er` command (or `er cleanup`) stops the processes
of recorded sessions whose driver is gone. A session whose driver lives, or that er did not start,
is never touched.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

import psutil

__all__ = ["exit_on_sigterm", "finish", "ray_temp_root", "reap", "record", "session_processes"]


def ray_temp_root() -> str:
    """Where a local Ray keeps its sessions: Ray's own default (RAY_TMPDIR, else TMPDIR on Linux, else /tmp) + ray/."""
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()
    return os.path.join(base, "ray")


def _records(root: str | None) -> Path:
    return Path(root or ray_temp_root()) / "er-sessions"


def record(root: str, session_dir: str | None = None) -> Path:
    """Write this driver's record: before `ray.init` (a driver killed while Ray starts is found too) and after."""
    me = psutil.Process()
    info = {"pid": me.pid, "started": me.create_time(), "host": socket.gethostname(), "session_dir": session_dir}
    path = _records(root) / f"{me.pid}-{int(info['started'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)  # a reader never sees half a record
    return path


def _alive(info: dict) -> bool:
    try:
        p = psutil.Process(info["pid"])
        # Same pid and start time: not a new process that reused the pid.
        return abs(p.create_time() - info["started"]) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Live processes of one Ray session: the session dir in their command line, or a file open under it.

    Ray's agents and workers rename themselves (`ray::DashboardAgent`), so their command line no longer
    names the session; they still hold its log files open.
    """
    marks = {session_dir.rstrip("/"), os.path.realpath(session_dir)}
    names = re.compile("|".join(re.escape(m) for m in marks) + r"(/|$)")
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            if any(names.search(a) for a in p.info["cmdline"] or ()) or any(names.match(f.path) for f in p.open_files()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone meanwhile, a zombie, or not ours
            pass
    return out


def _stop(procs: list[psutil.Process], grace: float = 1.0) -> int:
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:  # the agents ignore SIGTERM once their raylet is gone
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def _sessions_of(info: dict, root: str) -> list[str]:
    """Session dirs of a driver that died inside `ray.init`: Ray names a session after the process starting it."""
    found = glob.glob(os.path.join(root, f"session_*_{info['pid']}"))
    return [d for d in found if os.path.getmtime(d) >= info["started"] - 1]


def reap(root: str | None = None) -> list[dict]:
    """Stop the processes of every recorded session whose driver is gone; return those sessions."""
    root = root or ray_temp_root()
    cleaned = []
    for path in sorted(_records(root).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed meanwhile by another er
        if info.get("host") != socket.gethostname() or _alive(info):
            continue
        dirs = [info["session_dir"]] if info.get("session_dir") else _sessions_of(info, root)
        info["processes"] = sum(_stop(session_processes(d)) for d in dirs)
        path.unlink(missing_ok=True)
        cleaned.append(info)
    return cleaned


def finish(session_dir: str, path: Path) -> None:
    """At the driver's exit, after `ray.shutdown()`: stop what is left of its own session, drop its record."""
    _stop(session_processes(session_dir))
    path.unlink(missing_ok=True)


def exit_on_sigterm() -> None:
    """SIGTERM becomes a normal exit (status 143): `finally` blocks and atexit hooks, `ray.shutdown()` too, run."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)
