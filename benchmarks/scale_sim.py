"""A metadata-faithful big cache: what commits, opens, lookups, a random sample, index merges and key claims cost at 100k, 1M and 10M rows.

    python -m benchmarks.bench_scale --simulate [--sizes 100000,1000000,10000000] [--no-s3] [--out JSON] [--report MD]

Everything but the states is er's own: keys from er_core.keys.example_key, shards written by
store.writer.write_shard (64-row groups, one plain page per column chunk, offsets and crc32s in the index),
ingest's default shard size and commit cadence (pipelines.configs.IngestConfig: 512-row shards, a commit
every 16), CacheWriter.commit (index segments, merge_plan's merges, the log, a checkpoint every 16 versions).
States are tiny (H=4 fp16, 4-8 tokens a row, ~130 bytes of shard a row), so ten million rows fit on disk.

One cache grows through the sizes. At each size it is measured (open, locate, sample, full index merge, key
claims; locally and on S3 for open, locate and sample), then WINDOW more commits of 16 shards are timed: the
commit figures at N are the mean over the WINDOW commits that follow N rows (so the cache grows by
WINDOW x 16 x 512 = 819k rows during them). Only `commit()` is timed, not the shard writes before it. S3 gets
what the reads need: the checkpoint and the commits after it, the live index segments and the shards the
sample touches (readers never list, so the rest is never asked for). While building, a new writer with no
retention opens every REOPEN commits, so the segments merges replaced are deleted (one writer keeps them all
for 24 h: about 19 GB of them at 10M rows, see the report's notes).

Results: benchmarks/results/scale-simulate.json, and the second part of the report's `scale` section.
The 10M run took about 20 minutes on 2 shared cores and peaks near 8 GB of disk under /tmp.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from . import io_count

SIM_SIZES = (100_000, 1_000_000, 10_000_000)
H, TOKENS = 4, (4, 9)  # hidden size and token count range [lo, hi) of a simulated row
SAMPLE = 5_000  # keys a random-sample task looks up and reads
WINDOW = 100  # commits averaged at each size
REOPEN = 100  # commits per writer while building (each opening deletes what merges replaced)
CLAIM_CALLS = 40  # KeyClaims.claim calls timed, one shard of keys each (ingest's unit)
REPEATS = 3  # opens, lookups and reads are repeated on fresh readers, the fastest kept (bytes are deterministic)
OPEN_GOAL_BYTES, OPEN_GOAL_S, COMMIT_GOAL, SAMPLE_GOAL = 2_000_000, 1.0, 1.5, 2.0


# ---------------------------------------------------------------- the simulated cache


def settings():
    from er_core.keys import TokenizerSettings

    return TokenizerSettings(name="simulated", fingerprint="0" * 64, max_length=16)


def spec():
    from er_core.store import CacheSpec

    return CacheSpec(model_name="simulated", model_type="bert", lower_fingerprint="0" * 64, layer=3, num_layers=12,
                     hidden_size=H, tokenizer=settings(), codec="fp16")


def keys_of(rows) -> list[str]:
    """Row i's key: the real key scheme over a unique text."""
    from er_core.keys import example_key

    s = settings()
    return [example_key({"text": f"simulated example {int(i)}"}, s) for i in rows]


def shard_table(start: int, stop: int, rng):
    """Rows start..stop as one shard's table, built from whole buffers (no Python object per row but the key)."""
    from er_core.store import PackedRows, get_codec, packed_table

    n = stop - start
    lengths = rng.integers(*TOKENS, n).astype(np.int32)
    total = int(lengths.sum())
    rows = PackedRows(keys_of(range(start, stop)), lengths, rng.integers(1000, 30000, total, dtype=np.int32),
                      np.zeros(n, np.bool_))
    payload, _ = get_codec("fp16").encode(rng.standard_normal((total, H), dtype=np.float32))
    rows.payload = np.frombuffer(payload, np.uint8)
    return packed_table(rows, "fp16")


class Builder:
    """Grows the cache as `er ingest` would (shards of `shard_rows`, a commit every `commit_every`), timing each commit."""

    def __init__(self, url: str, shard_rows: int, commit_every: int, seed: int = 0):
        self.url, self.shard_rows, self.commit_every = url, shard_rows, commit_every
        self.rng = np.random.default_rng(seed)
        self.rows = 0
        self.commits: list[dict] = []  # every timed commit: rows before, seconds, bytes written, segments merged
        self.write_seconds = 0.0  # shard writes only
        self.seconds = 0.0  # everything grow() did: the build rate

    def grow(self, to_rows: int | None = None, commits: int | None = None) -> None:
        """Add rows up to `to_rows`, or `commits` full commits. A new writer every REOPEN commits, with no retention:
        its opening deletes the segments merges replaced (one writer with the 24 h default keeps them all, see the
        report). Opening a writer (its lock, orphan sweep and fencing commit) is not timed."""
        from er_core.store import CacheWriter, write_shard

        start, done = time.perf_counter(), 0
        while (to_rows is None or self.rows < to_rows) and (commits is None or done < commits):
            with CacheWriter(self.url, spec(), shard_rows=self.shard_rows, retain=0) as w:
                pending, opened = 0, done
                while (to_rows is None or self.rows < to_rows) and (commits is None or done < commits) and done - opened < REOPEN:
                    stop = self.rows + self.shard_rows if to_rows is None else min(to_rows, self.rows + self.shard_rows)
                    t0 = time.perf_counter()
                    w.add_shard(write_shard(self.url, w.next_shard_name(), shard_table(self.rows, stop, self.rng)))
                    self.write_seconds += time.perf_counter() - t0
                    self.rows, pending = stop, pending + 1
                    if pending == self.commit_every or (to_rows is not None and self.rows >= to_rows):
                        self.commits.append(self.timed_commit(w))
                        done, pending = done + 1, 0
        self.seconds += time.perf_counter() - start

    def timed_commit(self, w) -> dict:
        before, rows = {s.path for s in w.manifest.index}, self.rows
        t0, wall = time.perf_counter(), time.time()
        m = w.commit()
        seconds = time.perf_counter() - t0
        root = Path(self.url)
        new = [s for s in m.index if s.path not in before]
        log = [root / "_log" / f"{m.generation:020d}.json"]
        if m.generation % 16 == 0:  # log.CHECKPOINT_EVERY: this commit also wrote a checkpoint and its pointer
            log += [root / "_log" / f"{m.generation:020d}.checkpoint.json", root / "_log" / "_last_checkpoint"]
        return {"rows": rows, "version": m.generation, "seconds": seconds, "t0": wall, "t1": time.time(),
                "segment_bytes": sum(s.bytes for s in new), "log_bytes": sum(p.stat().st_size for p in log),
                "merged_segments": len(before - {s.path for s in m.index}), "segments": len(m.index),
                "checkpoint": m.generation % 16 == 0}


# ---------------------------------------------------------------- measurements at one size


def reads_between(logs: Path, t0: float, t1: float, prefix: str) -> list:
    return [r for r in io_count.load(logs) if t0 <= r.t <= t1 and r.path.startswith(prefix)]


def counted(logs: Path, prefix: str, fn, repeats: int = REPEATS) -> tuple[dict, object]:
    """Run `fn` `repeats` times; the fastest time, and the bytes and requests of storage reads under `prefix`."""
    best, out = None, None
    for _ in range(repeats):
        t0 = time.time()
        p0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - p0
        reads = reads_between(logs, t0, time.time(), prefix)
        got = {"seconds": round(seconds, 4), "bytes": sum(r.nbytes for r in reads), "requests": len(reads)}
        best = got if best is None or got["seconds"] < best["seconds"] else best
    return best, out


def measure_open(url: str, logs: Path, prefix: str) -> tuple[dict, object]:
    from er_core.store import open_state

    files: list[str] = []

    def opened():
        files.clear()
        return open_state(url, counter=files.append)

    got, state = counted(logs, prefix, opened)
    return {**got, "files": len(files), "checkpoint_version": state.generation // 16 * 16,
            "commits_after_checkpoint": state.generation % 16, "version": state.generation,
            "segments": len(state.index)}, state


def measure_reads(url: str, state, rows: np.ndarray, logs: Path, prefix: str) -> dict:
    """Locate the sample's keys on a fresh reader, then read their states (what training reads)."""
    from er_core.store import open_cache

    keys = keys_of(rows)
    located, locs = counted(logs, prefix, lambda: open_cache(url, manifest=state).locate(keys))
    assert locs.num_rows == len(keys), (locs.num_rows, len(keys))
    reader = open_cache(url, manifest=state)
    read, _ = counted(logs, prefix, lambda: reader.read_located(locs, ["hidden", "scale"]))
    own = int(locs.column("length").to_numpy().sum()) * H * 2  # fp16
    return {"locate": located, "sample": {**read, "own_state_bytes": own, "ratio": round(read["bytes"] / own, 3),
                                          "real_size_ratio": real_size_ratio(locs)}}


def real_size_ratio(locs, bytes_per_token: int = 768 * 2) -> float:
    """What the same rows' read would cost with BERT-base fp16 states (1,536 bytes a token), by the reader's own
    merge rule: spans closer than parquet_io.COALESCE (4 KB) are fetched together. A real row is over 4 KB, so
    only consecutive rows of one row group merge, each pair adding the 4-byte length between them; tiny rows
    instead merge across gaps of up to 4 KB, many rows' worth, which the measured `ratio` counts."""
    from er_core.store.parquet_io import COALESCE
    from er_core.store.writer import GROUP_ROWS

    assert 4 * bytes_per_token > COALESCE  # the shortest simulated row is 4 tokens: never merged across
    names = np.array([bytes(x) for x in locs.column("name").to_pylist()])
    row = locs.column("row").to_numpy().astype(np.int64)
    order = np.lexsort((row, names))
    names, row = names[order], row[order]
    adjacent = int(np.sum((names[1:] == names[:-1]) & (row[1:] == row[:-1] + 1) & (row[1:] // GROUP_ROWS == row[:-1] // GROUP_ROWS)))
    own = int(locs.column("length").to_numpy().sum()) * bytes_per_token
    return round((own + 4 * adjacent) / own, 5)


def measure_full_merge(url: str, state, logs: Path, scratch: Path, keys: list[str]) -> dict:
    """Every live segment merged into one (what `er cache compact` does to the index), written to a scratch file
    so the cache's own merge history goes on undisturbed; then `keys` located in it (a compacted cache's lookup)."""
    from er_core.store.index import Index, SegmentInfo, key_digests, segment_bytes
    from er_core.store import put_atomic, url_to_fs

    fs, root = url_to_fs(url)

    def merge():
        ix = Index(fs, root, state.index, url)
        data, rows = segment_bytes([ix.entries()], ix.shards())
        put_atomic(fs, str(scratch), data)
        return SegmentInfo(scratch.name, rows, len(data), "")

    got, merged = counted(logs, f"{root}/", merge, repeats=1)
    dig = key_digests(keys)
    located, found = counted(logs, str(scratch), lambda: Index(fs, str(scratch.parent), [merged], url).lookup(dig))
    assert len(found) == len(keys)
    scratch.unlink()
    return {**got, "segments": len(state.index), "bytes_written": merged.bytes, "locate_after": located}


def claim_batches(first_new: int, shard_rows: int, calls: int) -> list[list[str]]:
    """`calls` batches of keys not in the cache, one shard's worth each (a new corpus being ingested)."""
    return [keys_of(range(first_new + i * shard_rows, first_new + (i + 1) * shard_rows)) for i in range(calls)]


def measure_claims(url: str, state, batches: list[list[str]], logs: Path, prefix: str, ray_on: bool) -> dict:
    """KeyClaims asking the cache's index for each batch, in this process and as ingest's Ray actor."""
    import ray

    from er_core.corpus import KeyClaims
    from er_core.store import open_cache

    keys = sum(len(b) for b in batches)

    def rates(seconds: float, extra: dict) -> dict:
        return {"seconds": round(seconds, 3), "calls_per_s": round(len(batches) / seconds, 1),
                "claims_per_s": round(keys / seconds), **extra}

    claims = KeyClaims(index=open_cache(url, manifest=state).index)
    got, _ = counted(logs, prefix, lambda: [claims.claim(b) for b in batches], repeats=1)
    out = {"calls": len(batches), "keys_per_call": len(batches[0]),
           "in_process": rates(got["seconds"], {"bytes_per_call": got["bytes"] // len(batches)})}
    assert claims.claimed == keys  # every key is new: each was granted once
    if ray_on:
        actor = ray.remote(KeyClaims).options(num_cpus=0).remote(index=open_cache(url, manifest=state).index)
        ray.get(actor.stats.remote())  # the actor is up before the clock starts
        t0 = time.perf_counter()
        for b in batches:  # one call at a time: the latency a writer's batch waits
            ray.get(actor.claim.remote(b))
        out["ray_actor"] = rates(time.perf_counter() - t0, {})
        ray.kill(actor)
    return out


# ---------------------------------------------------------------- S3


def upload_for_reads(fs, local: Path, remote: str, state, sample_shards: set[str]) -> dict:
    """What opening, locating and reading the sample fetch: the last checkpoint and the commits after it, the live
    index segments, the sample's shards; log last, as a writer publishes."""
    from er_core.store.log import LAST_CHECKPOINT, checkpoint_path, commit_path

    t0 = time.perf_counter()
    cp = state.generation // 16 * 16
    data = [s.path for s in state.index] + sorted(sample_shards)
    log = ([checkpoint_path(cp)] if cp else []) + [commit_path(v) for v in range(cp + 1 if cp else 1, state.generation + 1)]
    log += [LAST_CHECKPOINT] if cp else []
    for rel in data + log:
        fs.put_file(str(local / rel), f"{remote}/{rel}")
    return {"files": len(data) + len(log), "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- the whole simulation


def measure_size(b: Builder, work: Path, logs: Path, fs, bucket: str | None, ray_on: bool, sample: int, claim_calls: int) -> dict:
    from er_core.store import open_cache
    from er_core.store.index import shard_path

    url, n = b.url, b.rows
    rng = np.random.default_rng(n)
    rows = np.sort(rng.choice(n, min(sample, n), replace=False))
    out = {"rows": n}
    out["open"], state = measure_open(url, logs, f"{url}/")
    out["checkpoint_bytes"] = (Path(url) / "_log" / f"{out['open']['checkpoint_version']:020d}.checkpoint.json").stat().st_size \
        if out["open"]["checkpoint_version"] else 0
    out.update(measure_reads(url, state, rows, logs, f"{url}/"))
    out["index_bytes"] = sum(s.bytes for s in state.index)
    out["shards"] = state.totals["shards"]
    out["full_merge"] = measure_full_merge(url, state, logs, work / "merged.idx", keys_of(rows))
    out["claims"] = measure_claims(url, state, claim_batches(10**12, b.shard_rows, claim_calls), logs, f"{url}/", ray_on)
    if fs is not None:
        remote = f"{bucket}/sim-{n}"
        locs = open_cache(url, manifest=state).locate(keys_of(rows))
        shards = {shard_path(bytes(x)) for x in locs.column("name").to_pylist()}
        out["s3_upload"] = upload_for_reads(fs, Path(url), remote, state, shards)
        s3_open, s3_state = measure_open(f"s3://{remote}", logs, f"{remote}/")
        out["s3"] = {"open": s3_open, **measure_reads(f"s3://{remote}", s3_state, rows, logs, f"{remote}/")}
        fs.rm(remote, recursive=True)
    return out


def window_stats(commits: list[dict], start_rows: int, window: int) -> dict:
    """Mean cost of the WINDOW commits that start at `start_rows`, and their merges."""
    w = [c for c in commits if c["rows"] >= start_rows][:window]
    merges = [c for c in w if c["merged_segments"]]
    written = [c["segment_bytes"] + c["log_bytes"] for c in w]
    return {"commits": len(w), "from_rows": w[0]["rows"], "to_rows": w[-1]["rows"] if w else start_rows,
            "mean_seconds": round(float(np.mean([c["seconds"] for c in w])), 4),
            "mean_bytes_written": round(float(np.mean(written))),
            "max_seconds": round(max(c["seconds"] for c in w), 3), "max_bytes_written": max(written),
            "checkpoints": sum(c["checkpoint"] for c in w), "merging_commits": len(merges),
            "merge_commit_mean_seconds": round(float(np.mean([c["seconds"] for c in merges])), 3) if merges else None,
            "merge_commit_mean_bytes": round(float(np.mean([c["segment_bytes"] + c["log_bytes"] for c in merges]))) if merges else None,
            "plain_commit_mean_seconds": round(float(np.mean([c["seconds"] for c in w if not c["merged_segments"]])), 4)}


def replay_merges(sizes, rows_per_commit: int, window: int = WINDOW) -> dict:
    """merge_plan replayed on segment sizes alone, to any size, as CacheWriter.commit applies it: the index entries
    a commit writes on average in the `window` commits from each size (x 60 bytes: most of a commit's bytes),
    and every entry written up to each size (what one writer keeping merged segments for the retention holds)."""
    from er_core.store.index import COMMIT_TIERS, SegmentInfo, merge_plan, tier

    segs, rows, total = [], 0, 0  # segs: those commits may still merge (tier-COMMIT_TIERS ones wait for compaction)
    todo, means, totals = sorted(sizes), {}, {}
    start = left = in_window = 0
    while todo or left:
        if left == 0 and todo and rows >= todo[0]:
            start, left, in_window = todo.pop(0), window, 0
            totals[start] = total
        new = SegmentInfo("", rows_per_commit, 0, "")
        merge = merge_plan(segs + [new])
        old = [s for s in merge if s is not new]
        written = rows_per_commit
        if old:
            with_new = any(s is new for s in merge)
            merged = SegmentInfo("", sum(s.rows for s in old) + (rows_per_commit if with_new else 0), 0, "")
            segs = [s for s in segs if all(s is not o for o in old)] + ([merged] if with_new else [merged, new])
            written = merged.rows + (0 if with_new else rows_per_commit)
            segs = [s for s in segs if tier(s.rows) < COMMIT_TIERS]
        else:
            segs.append(new)
        rows, total = rows + rows_per_commit, total + written
        if left:
            in_window, left = in_window + written, left - 1
            if left == 0:
                means[start] = round(in_window / window)
    return {"window_entries": {str(k): v for k, v in means.items()}, "total_entries": {str(k): v for k, v in totals.items()}}


def run(sizes=SIM_SIZES, out_json=None, s3: bool = True, ray_on: bool = True, shard_rows: int | None = None,
        commit_every: int | None = None, window: int = WINDOW, sample: int = SAMPLE, claim_calls: int = CLAIM_CALLS,
        keep: bool = False) -> dict:
    """Build the cache through `sizes`, measuring at each; returns (and writes) the results."""
    import tempfile

    from pipelines.configs import IngestConfig

    from .bench_scale import _sigterm, fresh_ray, reap_stale

    ingest = IngestConfig.__dataclass_fields__  # ingest's defaults: what a cache built by `er ingest` looks like
    shard_rows = shard_rows or ingest["shard_rows"].default
    commit_every = commit_every or ingest["commit_every"].default
    signal.signal(signal.SIGTERM, _sigterm)  # a SIGTERM stops the run through its clean-up (Ray, SeaweedFS, the cache)
    reap_stale(prefix="er-sim-")
    work = Path(tempfile.mkdtemp(prefix="er-sim-", dir="/tmp"))
    (work / "driver.pid").write_text(str(os.getpid()))
    logs = work / "reads"
    logs.mkdir()
    os.environ[io_count.ENV] = str(logs)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    io_count.install()
    server = stop_ray = fs = None
    results = {"sizes": list(sizes), "shard_rows": shard_rows, "commit_every": commit_every, "hidden_size": H,
               "tokens_per_row": list(TOKENS), "sample": sample, "window": window, "claim_calls": claim_calls, "at": {}}
    try:
        if s3:
            import s3fs

            from tests.s3_server import SeaweedS3

            server = SeaweedS3(work / "seaweedfs").start()
            os.environ.update(server.env())
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
        if ray_on:
            stop_ray = fresh_ray(work, cpus=2, object_store=200_000_000)
        b = Builder(str(work / "cache"), shard_rows, commit_every)
        for n in sorted(sizes):
            b.grow(to_rows=n)
            at = measure_size(b, work, logs, fs, server.bucket if server else None, ray_on, sample, claim_calls)
            at["build"] = {"seconds": round(b.seconds, 1), "rows_per_s": round(n / b.seconds), "disk_bytes": du(work / "cache")}
            b.grow(commits=window)
            at["commit"] = window_stats(b.commits, n, window)
            results["at"][str(n)] = at
            print(json.dumps({"rows": n, "open": at["open"], "commit": at["commit"]}), flush=True)
        results["write_seconds"] = round(b.write_seconds, 1)
        results["replay"] = replay_merges([*sizes, 100_000_000, 1_000_000_000], shard_rows * commit_every, window)
    finally:
        if stop_ray:
            stop_ray()
        if server:
            server.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    results["measured"] = time.strftime("%Y-%m-%d %H:%M")
    results["verdicts"] = verdicts(results)
    results["projection"] = projection(results)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(results, indent=1))
    return results


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- verdicts, projections, the report


def verdicts(results: dict) -> dict:
    """The acceptance checks, each with its numbers."""
    at = {int(k): v for k, v in results["at"].items()}
    lo, hi = min(at), max(at)
    out = {}
    if lo != hi:
        c0, c1 = at[lo]["commit"], at[hi]["commit"]
        t, b = c1["mean_seconds"] / c0["mean_seconds"], c1["mean_bytes_written"] / c0["mean_bytes_written"]
        out["commit"] = {"from": lo, "to": hi, "time_x": round(t, 2), "bytes_x": round(b, 2),
                         "met": t <= COMMIT_GOAL and b <= COMMIT_GOAL}
    o = at[hi]["open"]
    limit = OPEN_GOAL_BYTES + at[hi]["checkpoint_bytes"]
    out["open"] = {"rows": hi, "bytes": o["bytes"], "limit_bytes": limit, "seconds": o["seconds"],
                   "met": o["bytes"] <= limit and o["seconds"] <= OPEN_GOAL_S}
    ratios = {str(n): v["sample"]["ratio"] for n, v in at.items()}
    real = {str(n): v["sample"]["real_size_ratio"] for n, v in at.items()}
    out["sample"] = {"ratios": ratios, "met": all(r <= SAMPLE_GOAL for r in ratios.values()),
                     "real_size_ratios": real, "met_real_size": all(r <= SAMPLE_GOAL for r in real.values())}
    return out


# name, value at one size (None: not measured), unit; projected to 100M and 1B from the two largest sizes
METRICS = [
    ("commit: mean time (s)", lambda a: a["commit"]["mean_seconds"], "replay"),
    ("commit: mean bytes written", lambda a: a["commit"]["mean_bytes_written"], "replay"),
    ("open, local: bytes read", lambda a: a["open"]["bytes"], "bounded"),
    ("open, local: time (s)", lambda a: a["open"]["seconds"], "bounded"),
    ("open, S3: time (s)", lambda a: a.get("s3", {}).get("open", {}).get("seconds"), "bounded"),
    ("locate 5,000 keys: bytes read", lambda a: a["locate"]["bytes"], "segments"),
    ("locate 5,000 keys, local: time (s)", lambda a: a["locate"]["seconds"], "segments"),
    ("locate 5,000 keys, S3: time (s)", lambda a: a.get("s3", {}).get("locate", {}).get("seconds"), "segments"),
    ("locate 5,000 keys after compaction: bytes read", lambda a: a["full_merge"].get("locate_after", {}).get("bytes"), None),
    ("sample of 5,000 rows: bytes read / own states", lambda a: a["sample"]["ratio"], None),
    ("full index merge: bytes read", lambda a: a["full_merge"]["bytes"], "linear"),
    ("full index merge: time (s)", lambda a: a["full_merge"]["seconds"], "linear"),
    ("KeyClaims, in process: s per call (512 keys)", lambda a: 1 / a["claims"]["in_process"]["calls_per_s"], "segments"),
    ("KeyClaims, Ray actor: s per call (512 keys)",
     lambda a: 1 / a["claims"]["ray_actor"]["calls_per_s"] if "ray_actor" in a["claims"] else None, "segments"),
]


def project(f1: float, f10: float, how: str | None, replay: tuple[float, float, float] | None = None,
            worst: float | None = None) -> tuple[str, float, float]:
    """(model, value at 100M, at 1B) from the values at 1M and 10M. flat: growth under 15% a decade, kept;
    falling: kept at 10M's; log: under 3x a decade, the same difference added each decade; else the same factor
    each decade (power law). linear: proportional to rows; segments: the same, for lookups in a cache that is never
    compacted (a segment every 64 commits, each asked through its filter: an upper bound). replay: scaled as merge_plan's replayed entries
    written per commit. bounded: the worst measured at any size (opens: it follows the commits since the last
    checkpoint, 0-15, not the rows)."""
    if how == "bounded" and worst is not None:
        return "bounded (worst measured)", worst, worst
    if how == "linear":
        return "linear", f10 * 10, f10 * 100
    if how == "segments":  # uncompacted: a segment (its filter read) every 64 commits, so linear in rows at worst
        return "linear (uncompacted)", f10 * 10, f10 * 100
    if how == "replay" and replay:
        r10, r100, r1000 = replay
        return "merge replay", f10 * r100 / r10, f10 * r1000 / r10
    g = f10 / f1 if f1 else float("inf")
    if g < 1 / 1.15:
        return "falling: kept", f10, f10
    if g <= 1.15:
        return "flat", f10, f10
    if g <= 3:
        d = f10 - f1
        return "log", max(f10 + d, 0.0), max(f10 + 2 * d, 0.0)
    return f"x{g:.1f} a decade", f10 * g, f10 * g * g


def projection(results: dict) -> list[dict]:
    at = {int(k): v for k, v in results["at"].items()}
    if not {1_000_000, 10_000_000} <= set(at):
        return []
    rep = results.get("replay", {}).get("window_entries", {})
    replay = tuple(rep.get(str(n)) for n in (10_000_000, 100_000_000, 1_000_000_000))
    out = []
    for name, get, how in METRICS:
        f1, f10 = get(at[1_000_000]), get(at[10_000_000])
        if f1 is None or f10 is None:
            continue
        worst = max(v for v in (get(a) for a in at.values()) if v is not None)
        model, p100, p1000 = project(f1, f10, how, replay if all(replay) else None, worst)
        out.append({"metric": name, "1M": f1, "10M": f10, "model": model, "100M": p100, "1B": p1000})
    return out


def real_states(results: dict, bytes_per_row: float = 100e3) -> dict | None:
    """The 5,000-row sample with BERT-base-sized states (~100 KB a text): its own states, plus what the simulated
    run read beyond the tiny states' own (neighbours merged into one request: an upper bound, since real rows lie
    farther apart), plus the index lookups projected to 1B rows."""
    proj = {p["metric"]: p for p in projection(results)}
    if "locate 5,000 keys: bytes read" not in proj:
        return None
    a = results["at"]["10000000"]
    own = results["sample"] * bytes_per_row
    extra = a["sample"]["bytes"] - a["sample"]["own_state_bytes"]
    out = {"own_bytes": own, "extra_bytes": extra}
    for name, metric in (("uncompacted", "locate 5,000 keys: bytes read"), ("compacted", "locate 5,000 keys after compaction: bytes read")):
        if metric in proj:
            index = proj[metric]["1B"]
            out[name] = {"index_bytes": index, "total_bytes": own + extra + index, "ratio": (own + extra + index) / own}
    return out


def _n(n: int) -> str:
    return f"{n // 1_000_000_000}B" if n >= 10**9 else f"{n // 1_000_000}M" if n >= 10**6 else f"{n // 1000}k"


def _v(x: float) -> str:
    if isinstance(x, int) or (isinstance(x, float) and x >= 1000):
        return f"{x:,.0f}"
    return f"{x:.3g}"


def section(results: dict) -> list[str]:
    """The simulated part of the report's `scale` section (markdown lines)."""
    at = {int(k): v for k, v in results["at"].items()}
    sizes = sorted(at)
    kb = lambda b: f"{b / 1e3:,.1f}"
    lines = [
        "### Simulated big caches (`python -m benchmarks.bench_scale --simulate`)", "",
        f"Measured {results['measured']}. Real keys, shards (er's writer, {results['shard_rows']}-row shards as `er ingest`'s "
        f"default, 64-row groups), index, log and commits (every {results['commit_every']} shards), but tiny states "
        f"(H={results['hidden_size']} fp16, {results['tokens_per_row'][0]}-{results['tokens_per_row'][1] - 1} tokens a row). "
        f"One cache grows through {', '.join(_n(n) for n in sizes)} rows; at each size it is opened, {results['sample']:,} "
        f"random keys are located and their states read (fresh readers, fastest of {REPEATS}), its index is merged into one "
        f"(to a scratch file) and KeyClaims answers {results['claim_calls']} calls of {results['shard_rows']} new keys; then "
        f"{results['window']} commits are timed (the commit figures at N: their mean, from N rows on; only `commit()` "
        f"is timed). S3: SeaweedFS on 127.0.0.1, holding what the reads need. Bytes are storage reads counted by "
        f"benchmarks/io_count.py; requests: local read calls, S3 requests.", "",
        "| rows | shards | index segments | index (MB) | build rows/s | commit: mean s (max) | commit: mean KB written (max) | commits merging / checkpoints in the window | merging commit: mean s, KB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        a, c = at[n], at[n]["commit"]
        mc = f"{c['merge_commit_mean_seconds']}, {kb(c['merge_commit_mean_bytes'])}" if c["merging_commits"] else "none"
        lines.append(f"| {_n(n)} | {a['shards']:,} | {a['open']['segments']} | {a['index_bytes'] / 1e6:.1f} | "
                     f"{a['build']['rows_per_s']:,} | {c['mean_seconds']:.3f} ({c['max_seconds']}) | "
                     f"{kb(c['mean_bytes_written'])} ({kb(c['max_bytes_written'])}) | {c['merging_commits']} / {c['checkpoints']} | {mc} |")
    k = f"{results['sample']:,}"
    lines += ["", f"| rows | open: KB read, files, ms (local) | open: requests, ms (S3) | checkpoint KB | locate {k} keys: KB, requests, s (local) | "
              f"locate: requests, s (S3) | sample of {k}: KB read / own KB = ratio, s (local) | sample: s (S3) |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        a, s3 = at[n], at[n].get("s3", {})
        o, lo, sm = a["open"], a["locate"], a["sample"]
        lines.append(f"| {_n(n)} | {kb(o['bytes'])}, {o['files']}, {o['seconds'] * 1e3:.1f} | "
                     + (f"{s3['open']['requests']}, {s3['open']['seconds'] * 1e3:.1f} | " if s3 else "- | "))
        lines[-1] += (f"{kb(a['checkpoint_bytes'])} | {kb(lo['bytes'])}, {lo['requests']:,}, {lo['seconds']:.2f} | "
                      + (f"{s3['locate']['requests']:,}, {s3['locate']['seconds']:.2f} | " if s3 else "- | ")
                      + f"{kb(sm['bytes'])} / {kb(sm['own_state_bytes'])} = {sm['ratio']}, {sm['seconds']:.2f} | "
                      + (f"{s3['sample']['seconds']:.2f} |" if s3 else "- |"))
    lines += ["", f"| rows | full index merge (`er cache compact`): segments, MB read, MB written, s | after it, locate {k} keys: KB, s (local) | "
              "KeyClaims in process: calls/s, claims/s, KB read a call | KeyClaims Ray actor: calls/s, claims/s |",
              "|---|---|---|---|---|"]
    for n in sizes:
        m, cl = at[n]["full_merge"], at[n]["claims"]
        ip, ra = cl["in_process"], cl.get("ray_actor")
        la = m.get("locate_after")
        lines.append(f"| {_n(n)} | {m['segments']}, {m['bytes'] / 1e6:.1f}, {m['bytes_written'] / 1e6:.1f}, {m['seconds']:.2f} | "
                     + (f"{kb(la['bytes'])}, {la['seconds']:.2f} | " if la else "- | ") +
                     f"{ip['calls_per_s']}, {ip['claims_per_s']:,}, {kb(ip['bytes_per_call'])} | "
                     + (f"{ra['calls_per_s']}, {ra['claims_per_s']:,} |" if ra else "- |"))
    v = results["verdicts"]
    lines += ["", "Acceptance:", "", "| check | measured | verdict |", "|---|---|---|"]
    if "commit" in v:
        c = v["commit"]
        lines.append(f"| commit of {results['commit_every']} shards at {_n(c['to'])} <= {COMMIT_GOAL}x the same at {_n(c['from'])}, time and bytes written | "
                     f"time {c['time_x']}x, bytes {c['bytes_x']}x | {'met' if c['met'] else 'NOT met'} |")
    o = v["open"]
    lines.append(f"| open at {_n(o['rows'])}: <= 2 MB + one checkpoint ({o['limit_bytes'] / 1e6:.2f} MB), <= {OPEN_GOAL_S:g} s locally | "
                 f"{o['bytes'] / 1e6:.3f} MB, {o['seconds'] * 1e3:.1f} ms | {'met' if o['met'] else 'NOT met'} |")
    s = v["sample"]
    lines.append(f"| {results['sample']:,}-row sample reads <= {SAMPLE_GOAL:g}x its own states, every size: as measured (tiny states) | "
                 f"{', '.join(f'{_n(int(k))}: {r}x' for k, r in s['ratios'].items())} | {'met' if s['met'] else 'NOT met'} |")
    lines.append(f"| the same rows with BERT-base fp16 states (computed by the reader's merge rule) | "
                 f"{', '.join(f'{_n(int(k))}: {r}x' for k, r in s['real_size_ratios'].items())} | "
                 f"{'met' if s['met_real_size'] else 'NOT met'} |")
    proj = results.get("projection") or []
    if proj:
        rep = results.get("replay", {}).get("window_entries", {})
        lines += ["", "Projection on paper from the growth between 1M and 10M (model: *flat* = under 15% a decade, kept; "
                  "*falling: kept* = the 10M value; *bounded* = the worst at any measured size; *log* = under 3x a decade, the same difference added each decade; *xG a decade* = the same factor each decade; "
                  "*linear* = proportional to rows; *merge replay* = scaled as the index entries a commit writes, from "
                  "`merge_plan` replayed on segment sizes alone: "
                  + ", ".join(f"{_n(int(k))}: {int(e):,}" for k, e in sorted(rep.items(), key=lambda kv: int(kv[0]))) +
                  " entries a commit, mean over the window from each size). States do not enter these figures except the sample's.", "",
                  "| metric | 1M | 10M | model | 100M | 1B |", "|---|---|---|---|---|---|"]
        for p in proj:
            lines.append(f"| {p['metric']} | {_v(p['1M'])} | {_v(p['10M'])} | {p['model']} | {_v(p['100M'])} | {_v(p['1B'])} |")
        r = real_states(results)
        if r:
            idx = "; ".join(f"{name}, about {v['index_bytes'] / 1e6:,.1f} MB of index: {v['total_bytes'] / 1e6:,.0f} MB, "
                            f"{v['ratio']:.2f}x its own states" for name, v in r.items() if isinstance(v, dict))
            lines += ["", f"With real states (BERT-base, ~100 KB a text), the {results['sample']:,}-row sample at 1B rows would read "
                      f"its own {r['own_bytes'] / 1e6:,.0f} MB of states, plus at most {r['extra_bytes'] / 1e6:.2f} MB of "
                      f"neighbouring bytes (measured at 10M with tiny rows; real rows lie farther apart), and the index: {idx}."]
    return lines + [""] + notes(results)


def notes(results: dict) -> list[str]:
    """What the simulated tables say, computed from them."""
    from er_core.store.index import COMMIT_TIERS, RECORD, TIER
    from er_core.store.parquet_io import COALESCE

    at = {int(k): v for k, v in results["at"].items()}
    rep = results.get("replay", {})
    win, tot = rep.get("window_entries", {}), rep.get("total_entries", {})
    e = RECORD.itemsize
    out = []
    if win:
        pairs = ", ".join(f"{_n(n)}: {at[n]['commit']['mean_bytes_written'] / 1e6:.1f} MB measured, "
                          f"{win[str(n)] * e / 1e6:.1f} MB of entries replayed" for n in sorted(at) if str(n) in win)
        per = results["shard_rows"] * results["commit_every"]
        amortized = {int(k): v / (int(k) / per) for k, v in tot.items()}  # entries a commit wrote, on average, up to k
        lo, hi = min(amortized), max(amortized)
        out.append(f"- A commit's bytes are mostly the index entries it and its merges write ({e} bytes each), and they follow "
                   f"`merge_plan` replayed on sizes alone ({pairs}). Segments merge by size tier, {TIER} of a tier into one, up "
                   f"to tier {COMMIT_TIERS} ({TIER ** COMMIT_TIERS} commits' worth), so an entry of these commits is written at "
                   f"most {COMMIT_TIERS + 1} times: averaged over every commit up to each size, a commit writes "
                   f"{', '.join(f'{_n(k)}: {v * e / 1e6:.1f} MB' for k, v in sorted(amortized.items()))} "
                   f"({amortized[hi] / amortized[lo]:.1f}x from {_n(lo)} to {_n(hi)}). Bigger merges are `er cache compact`'s "
                   f"(the full index merge above, linear in the index, off the ingest path); until it runs, a cache gains a "
                   f"segment every {TIER ** COMMIT_TIERS} commits (the segments column), and a lookup of many keys reads each "
                   f"segment's Bloom filter where that is fewer bytes than its buckets. With every tier merging in commits "
                   f"(an entry rewritten log4(rows / commit) times) the same run measured 2.02x in time and 1.97x in bytes "
                   f"(benchmarks/results/scale-simulate-tiered.json); merging the smaller half of 9 segments, 10x and 15.5x "
                   f"(scale-simulate-half-merge.json).")
    if at:
        hi = max(at)
        out.append(f"- Disk: a commit deletes the segments its merge replaced at once (a reader still holding them looks its "
                   f"keys up in the latest segments), so a long `er ingest` holds only the live index: "
                   f"{at[hi]['index_bytes'] / 1e6:,.0f} MB at {_n(hi)} rows. Kept for the retention, as before, they summed to "
                   f"{', '.join(f'{_n(int(k))}: {v * e / 1e9:,.1f} GB' for k, v in sorted(tot.items(), key=lambda kv: int(kv[0])))} "
                   f"(replay).")
    out.append(f"- The sample's measured ratio is a tiny-state artifact: the reader fetches spans closer than {COALESCE:,} bytes in "
               f"one request, which with {results['hidden_size']}-dim rows of ~50 bytes spans many rows; real states "
               f"(kilobytes a row) merge only consecutive rows, as the computed ratio and the trainings above show.")
    if at:
        hi = max(at)
        o = at[hi]["open"]
        out.append(f"- Opening at {_n(hi)} read the last checkpoint and the {o['commits_after_checkpoint']} commits after it "
                   f"({o['files']} files, {o['bytes'] / 1e3:.1f} KB): what it reads depends on the number of segments and "
                   f"of commits since the last checkpoint (at most 15), not on the rows.")
    return out
