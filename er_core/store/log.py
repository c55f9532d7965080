"""The cache's commit log, after Delta Lake's `_delta_log`: numbered commit files plus periodic checkpoints.

    _log/00000000000000000001.json              commit 1 (creates the cache: its spec)
    _log/00000000000000000002.json              each commit names only what it adds and removes
    _log/00000000000000000016.checkpoint.json   the whole state at version 16 (every CHECKPOINT_EVERY)
    _log/_last_checkpoint                       {"version": 16}: where an opener starts

A commit is a put-if-absent of the next version number (S3 `If-None-Match: *`, a flock on disk), so of two
writers at most one wins a version and the other learns it lost: nothing is overwritten. Opening reads the
last checkpoint, then commits after it until one is absent (at most CHECKPOINT_EVERY small files). The
state holds no shard list (manifest.py), so a checkpoint's size follows the number of index segments (about
200 bytes each): one every 512k rows until `er cache compact` merges them (index.merge_plan), 40 KB at 100M
rows. Commits cost the same at any size, and opens nearly so.

A reader keeps the state it opened; a writer's later commits never change the files it names, and shards a
commit removes (compaction, repair) are deleted only after the retention (`removed` in the state), so it keeps
reading them. Index segments a commit merges away are deleted at once (a long ingest rewrites its index many
times): a reader that finds one gone looks its keys up in the latest version's segments (`LatestSegments`).

Why not the `deltalake` package: its log lists every data file in each checkpoint (so checkpoint cost grows
with the cache, as manifest.json did), and er's reads go through its own key index, which no table format
knows; the protocol's two ideas, put-if-absent commits and checkpoints, are what er takes from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

from ..errors import CacheCorruptError
from .index import SegmentInfo
from .manifest import COUNTS, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, CacheSpec, LegacyManifest, Manifest, legacy_error
from .storage import is_local, put_atomic, put_if, read_bytes, url_to_fs

LOG = "_log"
LAST_CHECKPOINT = f"{LOG}/_last_checkpoint"
CHECKPOINT_EVERY = 16


@dataclass(frozen=True)
class LatestSegments:
    """The latest version's index segments of a cache: an Index's `reopen` (picklable, so an actor's Index keeps it)."""

    url: str
    storage_options: dict | None = None

    def __call__(self) -> list[SegmentInfo]:
        fs, root = url_to_fs(self.url, self.storage_options)
        state = read_state(fs, root, self.url)
        return state.index if state else []


def commit_path(version: int) -> str:
    return f"{LOG}/{version:020d}.json"


def checkpoint_path(version: int) -> str:
    return f"{LOG}/{version:020d}.checkpoint.json"


def _json(fs, root: str, rel: str, url: str):
    data = read_bytes(fs, f"{root}/{rel}")  # FileNotFoundError: absent
    try:
        return json.loads(data)
    except ValueError as e:
        raise CacheCorruptError(f"{rel} of {url} is truncated or not valid JSON ({e}); the cache cannot be read") from None


def read_state(fs, root: str, url: str, counter=None, upgrading: bool = False, since: Manifest | None = None) -> Manifest | None:
    """The cache's latest state (None: no cache; a format 1-3 cache is refused unless `upgrading`).
    `since`: a state read earlier, brought up to date with the commits after it (no checkpoint read).
    `counter`, if given, is called with each file read."""
    state, version = since, since.generation if since else 0
    try:
        if since is not None:
            raise FileNotFoundError  # start from `since`
        version = int(_json(fs, root, LAST_CHECKPOINT, url)["version"])
        state = Manifest.from_dict(_json(fs, root, checkpoint_path(version), url), f"{checkpoint_path(version)} of {url}")
        if counter:
            counter(LAST_CHECKPOINT), counter(checkpoint_path(version))
    except FileNotFoundError:
        state, version = since, since.generation if since else 0
    except (KeyError, TypeError, ValueError):
        raise CacheCorruptError(f"{LAST_CHECKPOINT} of {url} is malformed; the cache cannot be read") from None
    while True:
        try:
            record = _json(fs, root, commit_path(version + 1), url)
        except FileNotFoundError:
            break
        if counter:
            counter(commit_path(version + 1))
        state = apply(state, record, f"{commit_path(version + 1)} of {url}")
        version += 1
    if state is None and not upgrading:
        legacy(fs, root, url)
    return state


def legacy(fs, root: str, url: str) -> None:
    """Raise the upgrade message if `root` holds a format 1-3 cache."""
    try:
        data = read_bytes(fs, f"{root}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return
    try:
        version = json.loads(data).get("format_version")
    except (ValueError, AttributeError):
        version = "unknown"
    raise legacy_error(url, version)


def read_legacy(fs, root: str, url: str) -> LegacyManifest | None:
    try:
        return LegacyManifest.from_json(read_bytes(fs, f"{root}/{MANIFEST_NAME}"), f"{url}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return None


def apply(state: Manifest | None, record: dict, where: str) -> Manifest:
    """The state after one commit record."""
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME or record.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptError(f"{where} is not an er cache commit of format {FORMAT_VERSION} (written by a newer er?)")
    try:
        if state is None or state.generation == 0:  # the first commit: none yet, or a writer's empty state
            if "spec" not in record:
                raise CacheCorruptError(f"{where} is the first commit found but names no spec; the log is incomplete")
            state = Manifest(spec=CacheSpec.from_dict(record["spec"]), created=float(record["time"]))
        gone = set(record.get("remove_segments", []))
        counts = {k: state.counts.get(k, 0) + record.get("counts", {}).get(k, 0) for k in COUNTS}
        skipped = dict(state.skipped)
        for k, n in record.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + n
        removed = {p: t for p, t in state.removed.items() if p not in set(record.get("forget", []))}
        removed.update({p: float(record["time"]) for p in record.get("remove_shards", [])})
        return replace(state, generation=int(record["version"]), counts=counts, skipped=skipped,
                       index=[s for s in state.index if s.path not in gone] + [SegmentInfo(**s) for s in record.get("add_segments", [])],
                       next_id=int(record.get("next_id", state.next_id)), updated=float(record["time"]),
                       writer=str(record.get("writer", "")), removed=removed)
    except (KeyError, TypeError, ValueError) as e:
        raise CacheCorruptError(f"{where} is missing or has a malformed field: {e}") from None


def record(state: Manifest | None, spec: CacheSpec, writer: str, op: str, *, add_segments=(), remove_segments=(),
           add_shards=(), remove_shards=(), counts=None, skipped=None, next_id=None, forget=()) -> dict:
    """The commit record that follows `state` (None: the cache's first)."""
    from .. import __version__

    r = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "er_version": __version__,
         "version": (state.generation if state else 0) + 1, "time": time.time(), "writer": writer, "op": op,
         "add_segments": [asdict(s) for s in add_segments], "remove_segments": list(remove_segments),
         "add_shards": [asdict(s) for s in add_shards], "remove_shards": list(remove_shards), "counts": counts or {}, "skipped": skipped or {},
         "next_id": next_id if next_id is not None else (state.next_id if state else 0), "forget": list(forget)}
    if state is None or state.generation == 0:
        r["spec"] = spec.to_dict()
    return r


def commit(fs, root: str, url: str, state: Manifest | None, rec: dict) -> Manifest:
    """Write `rec` as the next version if nobody has (PreconditionFailed otherwise); checkpoint on the cadence."""
    version = rec["version"]
    if is_local(fs):
        fs.makedirs(f"{root}/{LOG}", exist_ok=True)
    put_if(fs, f"{root}/{commit_path(version)}", json.dumps(rec, separators=(",", ":")).encode(), None)
    new = apply(state, rec, f"{commit_path(version)} of {url}")
    if version % CHECKPOINT_EVERY == 0:
        checkpoint(fs, root, new)
    return new


def all_shards(fs, root: str, url: str) -> list[dict]:
    """Every shard the whole log has added and not removed (what `er cache repair` falls back to when an index
    segment, which holds the shard lists, is damaged): reads every commit, so only repairs call it."""
    shards, version = {}, 0
    while True:
        try:
            rec = _json(fs, root, commit_path(version + 1), url)
        except FileNotFoundError:
            return sorted(shards.values(), key=lambda s: s["id"])
        for s in rec.get("add_shards", []):
            shards[s["path"]] = s
        for p in rec.get("remove_shards", []):
            shards.pop(p, None)
        version += 1


def checkpoint(fs, root: str, state: Manifest) -> None:
    """The whole state at its version, then the pointer to it (a crash between them only costs a longer open)."""
    put_atomic(fs, f"{root}/{checkpoint_path(state.generation)}", json.dumps(state.to_dict()).encode())
    put_atomic(fs, f"{root}/{LAST_CHECKPOINT}", json.dumps({"version": state.generation}).encode())


