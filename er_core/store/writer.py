"""Adding rows to a cache: shard files first, then one commit to the log that publishes them with their index.

A shard is `shards/part-<run>-<tag>.parquet`, one row per example: key, length, input_ids, hidden, scale,
truncated. Rows hold real tokens only (no padding). `hidden` is the codec's raw little-endian bytes of a
(length, H) array (codecs.py), so pandas, pyarrow and DuckDB read the files as they are. Each column chunk
is one plain page with page checksums, so every row's bytes sit at an offset the index records
(parquet_io.row_offsets): a task reads its own rows' bytes, wherever they lie.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ErError, LockLostError
from . import log as commit_log
from .codecs import get_codec
from .index import Index, SegmentInfo, key_digests, merge_plan, segment_bytes, shard_entries
from .manifest import CacheSpec, Manifest, ShardInfo
from .parquet_io import crc32s, row_offsets, to_parquet
from .storage import PreconditionFailed, WriterLock, is_local, put_atomic, url_to_fs

log = logging.getLogger("er.store")

GROUP_ROWS = 64  # rows per row group: whole-shard reads (checks, compaction) decode a group at a time
RETAIN = float(os.environ.get("ER_RETAIN", 24 * 3600))  # seconds a removed file stays for readers of older versions
_COMPRESSION = {"key": "zstd", "length": "zstd", "input_ids": "none", "hidden": "none", "scale": "none", "truncated": "zstd"}
# Per row of a shard, what its index entry needs (index.RECORD less the key digest, shard id and name).
ROWS = np.dtype([("length", "<i4"), ("crc", "<u4"), ("ids_at", "<u4"), ("hidden_at", "<u4"), ("scale_at", "<u4"),
                 ("ids_crc", "<u4"), ("row", "<i4")])

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("length", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("hidden", pa.binary()),
        ("scale", pa.binary()),
        ("truncated", pa.bool_()),
    ]
)


def encode_table(keys, input_ids, hidden, truncated, codec: str) -> pa.Table:
    """Build one shard's table from per-example float32 (length, H) arrays, encoded on the host."""
    from ..embed import Tokenized
    from .packed import PackedRows

    c = get_codec(codec)
    rows = PackedRows.of([(k, Tokenized(np.asarray(x, np.int32), bool(t))) for k, x, t in zip(keys, input_ids, truncated)])
    payloads, scales = zip(*(c.encode(np.asarray(h, dtype=np.float32)) for h in hidden)) if hidden else ((), ())
    rows.payload = np.frombuffer(b"".join(payloads), np.uint8)
    rows.scale = np.frombuffer(b"".join(scales), np.uint8) if c.scale_bytes_per_token else None
    return packed_table(rows, codec)


def packed_table(rows, codec: str) -> pa.Table:
    """One shard's table from a PackedRows with states: Arrow arrays over its buffers, no Python object per row."""
    c = get_codec(codec)
    n, off = len(rows), rows.offsets
    if off[-1] and len(rows.payload) % off[-1]:
        raise ErError(f"a shard's states payload ({len(rows.payload)} bytes) is not a whole number of tokens ({off[-1]})")
    per_token = len(rows.payload) // off[-1] if off[-1] else 0
    if len(rows.payload) >= 2**31:
        raise ErError(f"a shard's states exceed 2 GiB ({len(rows.payload)} bytes): lower --shard-rows")

    def binary(data: np.ndarray, unit: int) -> pa.Array:
        return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer((off * unit).astype(np.int32)), pa.py_buffer(data)])

    return pa.table(
        {
            "key": pa.array(rows.keys, pa.string()),
            "length": pa.array(rows.lengths, pa.int32()),
            "input_ids": pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(rows.ids, pa.int32())),
            "hidden": binary(rows.payload, per_token),
            "scale": binary(rows.scale, 4) if c.scale_bytes_per_token else pa.nulls(n, pa.binary()),
            "truncated": pa.array(rows.truncated, pa.bool_()),
        },
        schema=SCHEMA,
    )


def shard_name(run_id: str, tag: str | None = None) -> str:
    """`part-<run>-<tag>.parquet`: 12 hex digits each (the index keeps them as 12 bytes)."""
    return f"part-{run_id}-{tag or uuid.uuid4().hex[:12]}.parquet"


@dataclass
class Written:
    """A shard written but not committed: its ShardInfo, and what its index entries need."""

    info: ShardInfo
    digests: np.ndarray  # key digests, in row order
    rows: np.ndarray  # ROWS, in row order

    @property
    def lengths(self) -> np.ndarray:
        return self.rows["length"]

    @classmethod
    def from_buffers(cls, info: ShardInfo, digests: bytes, rows: bytes) -> "Written":
        """Rebuild from `digests.tobytes()` and `rows.tobytes()` (what an ingest task sends its driver)."""
        return cls(info, np.frombuffer(digests, dtype="S16"), np.frombuffer(rows, dtype=ROWS))


def write_shard(url: str, name: str, table: pa.Table, storage_options: dict | None = None) -> Written:
    """Write a shard file (not yet committed); return its ShardInfo and index material."""
    fs, root = url_to_fs(url, storage_options)
    # States are near-incompressible floats: store them plain, compress only keys, lengths and flags.
    data, footer = to_parquet(table, GROUP_ROWS, _COMPRESSION)
    if len(data) >= 2**32:
        raise ErError(f"a shard of {len(data)} bytes is past the index's 4 GiB offsets: lower --shard-rows")
    rows = row_material(data, table)
    rel = f"shards/{name}"
    if is_local(fs):
        fs.makedirs(f"{root}/shards", exist_ok=True)
    put_atomic(fs, f"{root}/{rel}", data, cached=False)
    info = ShardInfo(path=rel, rows=table.num_rows, tokens=int(rows["length"].sum()), bytes=len(data),
                     checksum=file_checksum(data), truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
                     footer_sha256=footer, group_rows=GROUP_ROWS)
    return Written(info, key_digests(table.column("key").to_pylist()), rows)


def file_checksum(data: bytes) -> str:
    """A shard file's checksum for `er cache verify`: crc32 (a file hash must keep up with a GPU node's states)."""
    return f"crc32:{zlib.crc32(data):08x}"


def row_material(data: bytes, table: pa.Table) -> np.ndarray:
    """ROWS of a shard file's bytes and its table: where each row's values are, and their crc32s."""
    scaled = table.column("scale").null_count < table.num_rows
    at = row_offsets(data, table, ["input_ids", "hidden", *(["scale"] if scaled else [])],
                     {"input_ids": 0, "hidden": 4, "scale": 4})
    rows = np.zeros(table.num_rows, ROWS)
    rows["length"] = table.column("length").to_numpy()
    rows["crc"] = crc32s(table, ["hidden", "scale"])
    rows["ids_crc"] = crc32s(table, ["input_ids"])
    rows["ids_at"], rows["hidden_at"] = at["input_ids"], at["hidden"]
    rows["scale_at"] = at["scale"] if scaled else 0
    rows["row"] = np.arange(table.num_rows)
    return rows


def _mtime(info: dict) -> float:
    t = info.get("mtime") or info.get("LastModified")  # local disk / S3
    return t.timestamp() if hasattr(t, "timestamp") else float(t or time.time())  # unknown age: keep it


class CacheWriter:
    """Adds rows to a cache. Shards are written first; `commit()` publishes them in one log version.

    Use as a context manager: on a clean exit pending rows are flushed and committed; on an error nothing new
    is committed and the cache stays at its last version. One writer at a time holds the cache's lock. Right
    after taking it, the writer commits a version of its own (a put-if-absent), and every commit is the next
    version after the last one it saw: a writer whose lock was taken can commit nothing after the new holder's.
    """

    def __init__(self, url: str, spec: CacheSpec, storage_options: dict | None = None, shard_rows: int = 1024,
                 lock_ttl: float = 600.0, retain: float = RETAIN, upgrading: bool = False, known: Manifest | None = None):
        self.url, self.storage_options, self.shard_rows, self.retain = url, storage_options, shard_rows, retain
        self.fs, self.root = url_to_fs(url, storage_options)
        self._upgrading = upgrading
        get_codec(spec.codec)
        self.lock = WriterLock(self.fs, self.root, ttl=lock_ttl)
        self.lock.acquire()
        self.run_id = self.lock.info["run_id"]
        self._pending: list[Written] = []
        self._skipped: dict = {}
        self._forget: list[str] = []
        self._buf: list[tuple] = []
        self._seq = 0
        try:
            self._fence(spec, known)
            if not upgrading:  # an old-format cache's files are listed in its manifest.json, not the log
                self._remove_orphans()
        except BaseException:
            self.lock.release()
            raise
        self.spec = self.manifest.spec

    def _fence(self, spec: CacheSpec, known: Manifest | None) -> None:
        """Commit a version of this run's, so that the previous holder's next commit fails. `known`: the state the
        caller opened before taking the lock; only the commits after it are read."""
        state = commit_log.read_state(self.fs, self.root, self.url, upgrading=self._upgrading, since=known)
        self.manifest = state or Manifest(spec=spec)  # generation 0: no commit yet
        prev = self.lock.replaced
        if state is None and (prev is None or self.lock.ended(prev)):
            return  # nobody can commit: the cache is created by this writer's first commit
        # A holder judged stale by its age may still live and create the cache: this writer creates it first.
        self.manifest.spec.check(spec, self.url, check_codec=True)
        self._commit(commit_log.record(self.manifest, spec, self.run_id, "stamp"))

    def _commit(self, rec: dict) -> Manifest:
        if not self.lock.held:
            raise LockLostError(f"run {self.run_id} no longer holds the lock of {self.url}; nothing was committed")
        try:
            self.manifest = commit_log.commit(self.fs, self.root, self.url, self.manifest, rec)
        except PreconditionFailed:
            raise LockLostError(
                f"version {rec['version']} of {self.url} was committed by another writer: run {self.run_id} lost its "
                f"lock and committed nothing more (what it committed earlier stays); re-run to complete the cache"
            ) from None
        return self.manifest

    def listed(self) -> set[str]:
        """Files the current version names: its shards and index segments."""
        state = self.manifest
        return {s["path"] for s in Index(self.fs, self.root, state.index, self.url).shards()} | {s.path for s in state.index}

    def _remove_orphans(self) -> None:
        """Delete files no version can still need: unlisted shards and segments of the run whose ended lock this
        writer took, or older than the lock's stale timeout (a live writer's fresh files stay), unless a commit
        removed them less than `retain` seconds ago (a reader of an older version may still read them)."""
        listed = {p.rsplit("/", 1)[-1] for p in self.listed()}
        state = self.manifest
        now = time.time()
        young = {p.rsplit("/", 1)[-1] for p, t in state.removed.items() if now - t < self.retain}
        self._forget = [p for p, t in state.removed.items() if now - t >= self.retain]
        self._delete(self._forget)  # removed by a commit, past the retention: no version being read names them
        prev = self.lock.replaced
        ended = prev.get("run_id") if prev and self.lock.ended(prev) else None
        for folder, prefix in (("shards", "part"), ("index", "seg")):
            try:
                files = self.fs.ls(f"{self.root}/{folder}", detail=True, refresh=True)
            except FileNotFoundError:
                continue
            for f in files:
                name = f["name"].rstrip("/").rsplit("/", 1)[-1]
                parts = name.split("-")  # <prefix>-<run>-<n>.parquet|idx
                if name in listed or name in young or parts[0] != prefix or len(parts) < 3 or parts[1] == self.run_id:
                    continue
                if parts[1] == ended or now - _mtime(f) > self.lock.ttl:
                    try:
                        self.fs.rm_file(f["name"])
                    except FileNotFoundError:
                        pass

    def reader(self):
        """A reader of what this writer has committed so far."""
        from .reader import CacheReader

        return CacheReader(self.url, self.manifest, self.storage_options)

    def next_shard_name(self) -> str:
        self._seq += 1
        return shard_name(self.run_id, f"{self._seq:012x}")

    def add(self, key: str, input_ids, hidden: np.ndarray, truncated: bool = False) -> None:
        if len(input_ids) != len(hidden) or len(input_ids) == 0:
            raise ErError(f"example {key}: {len(input_ids)} token ids but {len(hidden)} hidden states")
        if hidden.shape[-1] != self.spec.hidden_size:
            raise ErError(f"example {key}: hidden size {hidden.shape[-1]}, cache expects {self.spec.hidden_size}")
        self._buf.append((key, input_ids, hidden, truncated))
        if len(self._buf) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        keys, ids, hidden, trunc = zip(*self._buf)
        table = encode_table(keys, ids, hidden, trunc, self.spec.codec)
        self.add_shard(write_shard(self.url, self.next_shard_name(), table, self.storage_options))
        self._buf = []

    def add_shard(self, written: Written) -> None:
        """Register a shard already written (e.g. by an ingestion actor) for the next commit."""
        self._pending.append(written)
        # A beat per shard was a lock write per shard: at a GPU node's rate (68 shards/s) the driver's ceiling.
        if time.monotonic() - self.lock.beat_at > min(10.0, self.lock.ttl / 6):
            self.lock.heartbeat()

    def count_skipped(self, reason: str, n: int = 1) -> None:
        self._skipped[reason] = self._skipped.get(reason, 0) + n

    def commit(self) -> Manifest:
        """Publish every shard written so far, with its index segment; readers see all of them or none."""
        m = self.manifest
        if not self._pending and not self._skipped and not self._forget:
            self.lock.heartbeat()  # nothing to publish, but a writer whose lock was taken still learns it here
            return m
        next_id = m.next_id
        shards = [replace(w.info, id=next_id + i) for i, w in enumerate(self._pending)]
        add, remove, version = [], [], m.generation + 1
        if shards:
            entries = [shard_entries(w.digests, s.id, s.path, w.rows) for w, s in zip(self._pending, shards)]
            new = SegmentInfo("", sum(s.rows for s in shards), 0, "")  # the segment to come, for the merge plan
            merge = merge_plan(m.index + [new])
            old = [s for s in merge if s is not new]
            if old:  # too many segments: the smaller ones become one (the merged files stay for the retention)
                ix = Index(self.fs, self.root, old, self.url)
                parts, listing = [ix.entries()], [ShardInfo(**x) for x in ix.shards()]
                if any(s is new for s in merge):
                    entries, shards_in = parts + entries, listing + shards
                else:
                    add.append(self.write_segment(parts, listing, version, "m"))
                    shards_in = shards
                remove = [s.path for s in old]
            else:
                shards_in = shards
            add.append(self.write_segment(entries, shards_in, version))
        counts = {k: sum(getattr(s, k) for s in shards) for k in ("rows", "tokens", "bytes", "truncated")}
        counts["shards"] = len(shards)
        self._commit(commit_log.record(m, self.spec, self.run_id, "append", add_segments=add, remove_segments=remove,
                                       add_shards=shards, counts=counts, skipped=self._skipped, next_id=next_id + len(shards),
                                       forget=self._forget))
        self._delete(remove)  # merged away: their entries are in the merged segment (readers reopen, Index)
        self._pending, self._skipped, self._forget = [], {}, []
        self.lock.heartbeat()
        return self.manifest

    def _delete(self, paths) -> None:
        for p in paths:
            try:
                self.fs.rm_file(f"{self.root}/{p}")
            except FileNotFoundError:
                pass

    def write_segment(self, entries: list[pa.Table], shards: list[ShardInfo], generation: int, tag: str = "") -> SegmentInfo:
        data, rows = segment_bytes(entries, shards)
        rel = f"index/seg-{self.run_id}-{generation:08d}{tag}.idx"
        if is_local(self.fs):
            self.fs.makedirs(f"{self.root}/index", exist_ok=True)
        put_atomic(self.fs, f"{self.root}/{rel}", data)
        return SegmentInfo(rel, rows, len(data), hashlib.sha256(data).hexdigest(), len(shards))

    def replace_all(self, op: str, entries: list[pa.Table], shards: list[ShardInfo], removed_shards: list[ShardInfo],
                    next_id: int | None = None) -> Manifest:
        """One commit whose index is one new segment of `shards`, replacing every segment (repair, compaction)."""
        m = self.manifest
        seg = self.write_segment(entries, shards, m.generation + 1, op[0]) if shards else None
        before = m.totals
        counts = {k: sum(getattr(s, k) for s in shards) - before[k] for k in ("rows", "tokens", "bytes", "truncated")}
        counts["shards"] = len(shards) - before["shards"]
        old = [s.path for s in m.index]
        state = self._commit(commit_log.record(
            m, self.spec, self.run_id, op, add_segments=[seg] if seg else [], remove_segments=old,
            add_shards=[s for s in shards if s.id >= m.next_id], remove_shards=[s.path for s in removed_shards],
            counts=counts, next_id=m.next_id if next_id is None else next_id, forget=self._forget))
        self._delete(old)
        return state

    def close(self) -> Manifest:
        try:
            self.flush()
            return self.commit()
        finally:
            self.lock.release()

    def abort(self) -> None:
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
