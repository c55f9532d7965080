"""The writer lock and the fenced commit, on local disk and on the S3 server: of several takers of a stale
lock exactly one wins; a writer whose lock was taken commits nothing; orphan clean-up never deletes a
committed shard, nor a live writer's fresh one.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import socket
import threading
import time
import uuid

import numpy as np
import pytest

from er_core import CacheSpec, open_cache
from er_core.store.writer import CacheWriter
from er_core.errors import CacheLockedError
from er_core.keys import TokenizerSettings
from er_core.store.writer import encode_table, write_shard
from er_core.errors import LockLostError
from er_core.store.storage import WriterLock, put_atomic, read_lock, read_versioned, url_to_fs

H = 4
SPEC = CacheSpec(model_name="none", model_type="bert", lower_fingerprint="0" * 64, layer=1, num_layers=2, hidden_size=H,
                 tokenizer=TokenizerSettings("none", "0" * 64, 16), codec="fp32")
DEAD_PID = 2**22 + 12345  # above Linux's pid_max: never a live process
ROUNDS = 30


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "cache")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.bucket}/test-lock/{uuid.uuid4().hex[:8]}"


def _stale_records():
    """Lock contents a writer may take over: each way a holder can be gone."""
    host = socket.gethostname()
    return [
        json.dumps({"run_id": "deadpid", "host": host, "pid": DEAD_PID, "heartbeat": time.time()}).encode(),
        json.dumps({"run_id": "oldbeat", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}).encode(),
        json.dumps({"run_id": "done", "host": host, "pid": 1, "heartbeat": time.time(), "released": True}).encode(),
        b"{not json",
    ]


def _plant(url: str, round_: int) -> None:
    fs, root = url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    records = _stale_records()
    put_atomic(fs, f"{root}/_writer.lock", records[round_ % len(records)])


def _try_acquire(url: str) -> str | None:
    lock = WriterLock(*url_to_fs(url))
    try:
        lock.acquire()
    except CacheLockedError:
        return None
    return lock.info["run_id"]


def _racer(url: str, rounds: int, barrier, results) -> None:
    """One taker: every round, at the barrier, tries to take the freshly planted stale lock."""
    for r in range(rounds):
        barrier.wait(timeout=300)
        try:
            results.put((r, _try_acquire(url)))
        except Exception as e:  # noqa: BLE001 - the test reports it
            results.put((r, f"ERROR {e!r}"))
        barrier.wait(timeout=300)


def _holder(url: str) -> str:
    fs, root = url_to_fs(url)
    return json.loads(read_versioned(fs, f"{root}/_writer.lock")[0])["run_id"]


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_racing_takers_of_a_stale_lock_never_both_hold_it(url, kind):
    if kind == "threads":
        barrier, results = threading.Barrier(3), queue.Queue()
        racers = [threading.Thread(target=_racer, args=(url, ROUNDS, barrier, results)) for _ in range(2)]
    else:
        # spawn: racers start clean, as separate writers do, not as copies of this process and its S3 clients
        # (forked after the threads case, each round waited ~1 s on them: 32 s instead of 2)
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(3), ctx.Queue()
        racers = [ctx.Process(target=_racer, args=(url, ROUNDS, barrier, results)) for _ in range(2)]
    for t in racers:
        t.start()
    try:
        for r in range(ROUNDS):
            _plant(url, r)
            barrier.wait(timeout=300)  # go
            got = [results.get(timeout=300) for _ in range(2)]
            barrier.wait(timeout=300)  # both tried
            winners = [run for rr, run in got if run is not None]
            assert all(rr == r for rr, _ in got) and not [w for w in winners if w.startswith("ERROR")], got
            assert len(winners) == 1, f"round {r}: {len(winners)} writers hold the lock"
            assert _holder(url) == winners[0]  # the lock file names the one winner
    finally:
        for t in racers:
            t.join(timeout=60)
    if kind == "processes":
        assert all(p.exitcode == 0 for p in racers)


def _add(w: CacheWriter, keys) -> None:
    for k in keys:
        w.add(k, np.arange(3, dtype=np.int32), np.full((3, H), len(k), np.float32))


def _shard_names(url: str) -> set[str]:
    fs, root = url_to_fs(url)
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/shards", detail=False, refresh=True)}


def _manifest_bytes(url: str) -> bytes | None:
    """Every commit of the cache's log, in order (None: no commit yet)."""
    fs, root = url_to_fs(url)
    try:
        names = sorted(p for p in fs.ls(f"{root}/_log", detail=False, refresh=True) if p.endswith(".json"))
    except FileNotFoundError:
        return None
    return b"".join(read_versioned(fs, p)[0] or b"" for p in names) if names else None


def test_writer_whose_lock_was_taken_commits_nothing_and_its_fresh_shard_survives(url):
    ttl = 3.0  # > S3's one-second LastModified resolution plus the time one takeover takes
    a = CacheWriter(url, SPEC, shard_rows=2, lock_ttl=ttl)
    _add(a, ["a1", "a2"])  # a full shard: flushed and registered
    a.commit()
    committed = _shard_names(url)
    # A now runs "on another host" and stops beating (hung, or cut off): its lock goes stale after ttl.
    a.lock.info["host"] = "elsewhere"
    a.lock.heartbeat()
    time.sleep(ttl + 0.5)
    # ... while it goes on writing a shard, as its ingestion actors would.
    table = encode_table(["a3"], [np.arange(3)], [np.ones((3, H), np.float32)], [False], "fp32")
    late = write_shard(url, a.next_shard_name(), table)

    b = CacheWriter(url, SPEC, shard_rows=2, lock_ttl=ttl)  # takes the stale lock, fences the manifest
    assert read_lock(*url_to_fs(url))["run_id"] == b.run_id
    assert _shard_names(url) == committed | {late.info.path.rsplit("/", 1)[-1]}  # nothing of A's deleted

    before = _manifest_bytes(url)
    a._pending.append(late)
    with pytest.raises(LockLostError, match="lost its lock"):
        a.commit()
    assert _manifest_bytes(url) == before  # A changed nothing
    with pytest.raises(LockLostError, match="was taken by run " + b.run_id):
        a.lock.heartbeat()
    a.abort()  # must not release B's lock
    assert read_lock(*url_to_fs(url))["run_id"] == b.run_id

    _add(b, ["b1", "b2"])
    b.close()
    assert sorted(open_cache(url).keys()) == ["a1", "a2", "b1", "b2"]

    time.sleep(ttl + 0.5)  # A's uncommitted shard is now older than the stale timeout: the next writer removes it
    CacheWriter(url, SPEC, lock_ttl=ttl).close()
    assert late.info.path.rsplit("/", 1)[-1] not in _shard_names(url)
    reader = open_cache(url)
    assert reader.verify() == [] and sorted(reader.keys()) == ["a1", "a2", "b1", "b2"]


def test_taking_over_a_stale_first_writer_fences_the_missing_manifest(url):
    a = CacheWriter(url, SPEC, lock_ttl=1.0)
    a.lock.info["host"] = "elsewhere"
    a.lock.heartbeat()
    time.sleep(1.5)
    b = CacheWriter(url, SPEC, lock_ttl=1.0)
    fenced = _manifest_bytes(url)
    assert fenced is not None  # created by B's fence, so that A can no longer create it
    with pytest.raises(LockLostError, match="lost its lock|was taken by run"):
        a.commit()
    assert _manifest_bytes(url) == fenced
    a.abort()
    b.close()
    assert list(open_cache(url).keys()) == []


def test_writers_taking_turns_and_crashing_never_lose_a_committed_shard(url):
    """Two writers, many rounds: each opens the cache (waiting while the other holds it), commits a shard, then
    closes, or crashes leaving its lock (dead pid) and an uncommitted shard that the next writer removes."""
    committed: list[str] = []
    crashed_shards: list[str] = []
    errors: list[BaseException] = []

    def writer(name: str):
        try:
            for r in range(ROUNDS // 2):
                while True:
                    try:
                        w = CacheWriter(url, SPEC, shard_rows=2)
                        break
                    except CacheLockedError:
                        time.sleep(0.01)
                keys = [f"{name}-{r}-{i}" for i in range(2)]
                _add(w, keys)
                w.commit()
                committed.extend(keys)
                if r % 3 == 2:  # crash: its process "dies" with the lock held and a shard not yet committed
                    _add(w, [f"{name}-{r}-lost", f"{name}-{r}-lost2"])
                    crashed_shards.append(w._pending[-1].info.path.rsplit("/", 1)[-1])
                    w.lock.info["pid"] = DEAD_PID
                    w.lock.heartbeat()
                else:
                    w.close()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    CacheWriter(url, SPEC).close()  # takes over the last crashed lock, if any
    reader = open_cache(url)
    assert reader.verify() == []  # every committed shard is still there, intact
    assert sorted(reader.keys()) == sorted(committed)
    assert not set(crashed_shards) & _shard_names(url)  # crashed runs' uncommitted shards were removed


def test_ingest_heartbeat_stops_the_run_when_the_lock_is_lost(tmp_path):
    from pipelines.ingest import _Heartbeat

    url = str(tmp_path / "cache")
    w = CacheWriter(url, SPEC)
    fs, root = url_to_fs(url)
    thief = json.dumps({"run_id": "thief", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}).encode()
    t0 = time.monotonic()
    with pytest.raises(LockLostError, match="was taken by run thief"):
        with _Heartbeat(w, every=0.05, watch_nodes=False):  # the lock alone: no Ray here
            put_atomic(fs, f"{root}/_writer.lock", thief)  # another writer took it (unconditionally, for the test)
            while time.monotonic() - t0 < 60:  # the driver, waiting on Ray
                time.sleep(0.01)
    assert time.monotonic() - t0 < 10
    with pytest.raises(LockLostError):
        w.commit()
    w.abort()
    assert read_versioned(fs, f"{root}/_writer.lock")[0] == thief  # left as the new holder wrote it


def test_heartbeat_interrupts_a_driver_started_with_sigint_ignored(tmp_path):
    """`er ingest ... &` from a script, nohup, a Ray job: SIGINT is ignored there, and the lost lock must still end
    the run; the ignored disposition comes back afterwards."""
    import signal

    from pipelines.ingest import _Heartbeat

    url = str(tmp_path / "cache")
    w = CacheWriter(url, SPEC)
    fs, root = url_to_fs(url)
    thief = json.dumps({"run_id": "thief", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}).encode()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockLostError, match="was taken by run thief"):
            with _Heartbeat(w, every=0.05, watch_nodes=False):
                put_atomic(fs, f"{root}/_writer.lock", thief)
                while time.monotonic() - t0 < 30:
                    time.sleep(0.01)
        assert time.monotonic() - t0 < 10
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    w.abort()
