"""The recycled-embedding cache: Parquet shards of ragged layer-k states, a key index, and a manifest.

Layout under the cache URL (a local folder or `s3://bucket/prefix`):

    manifest.json                   committed last; lists every valid shard and index segment with checksums
    shards/part-<run>-<n>.parquet   one row per example: key, length, input_ids, hidden, scale, truncated
    index/seg-<run>-<gen>.idx       where each key lives: (digest, shard, group, row, length), see index.py
    _writer.lock                    names the writer holding the cache (or the last one, marked released)

Rows hold real tokens only (no padding). `hidden` is the codec's raw little-endian bytes of a
(length, H) array; decode with `np.frombuffer(hidden, dtype).reshape(length, H)` (see codecs.py),
so pandas, pyarrow and DuckDB read the files as they are. Shards are written in row groups of
GROUP_ROWS rows with page checksums, so a reader fetches and checks only the row groups and
columns it needs (parquet_io.py): a task's cost follows the task, not the cache.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .codecs import get_codec
from .errors import CacheCorruptError, CacheLockedError, ErError, LockLostError
from .index import SCHEMA as INDEX_SCHEMA
from .index import Index, SegmentInfo, key_digests, merge_plan, segment_bytes, shard_entries
from .manifest import FORMAT_VERSION, MANIFEST_NAME, CacheSpec, Manifest, ShardInfo
from .parquet_io import PartialFile, to_parquet
from .storage import PreconditionFailed, WriterLock, is_local, put_atomic, put_if, read_bytes, read_versioned, url_to_fs

OPEN_FILES = 256  # shard footers a reader keeps (a few KB each)
GROUP_ROWS = 64  # rows per row group: the unit a reader fetches (about 0.4-3 MB of fp16 states for H=384)
_COMPRESSION = {"key": "zstd", "length": "zstd", "input_ids": "zstd", "hidden": "none", "scale": "none", "truncated": "zstd"}

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
    from .embed import Tokenized
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


@dataclass
class Written:
    """A shard written but not committed: its manifest entry, and what its index entries need."""

    info: ShardInfo
    digests: np.ndarray  # key digests, in row order
    lengths: np.ndarray


def write_shard(url: str, name: str, table: pa.Table, storage_options: dict | None = None) -> Written:
    """Write a shard file (not yet committed); return its manifest entry and index material."""
    fs, root = url_to_fs(url, storage_options)
    # States are near-incompressible floats: store them plain, compress only keys and ids.
    data, footer = to_parquet(table, GROUP_ROWS, _COMPRESSION)
    rel = f"shards/{name}"
    if is_local(fs):
        fs.makedirs(f"{root}/shards", exist_ok=True)
    put_atomic(fs, f"{root}/{rel}", data)
    lengths = table.column("length").to_numpy()
    info = ShardInfo(path=rel, rows=table.num_rows, tokens=int(lengths.sum()), bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
                     footer_sha256=footer, group_rows=GROUP_ROWS)
    return Written(info, key_digests(table.column("key").to_pylist()), np.asarray(lengths, np.int32))


def _load_manifest(fs, root: str) -> Manifest | None:
    try:
        data = read_bytes(fs, f"{root}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, f"{root}/{MANIFEST_NAME}")


def _mtime(info: dict) -> float:
    t = info.get("mtime") or info.get("LastModified")  # local disk / S3
    return t.timestamp() if hasattr(t, "timestamp") else float(t or time.time())  # unknown age: keep it


class CacheWriter:
    """Adds rows to a cache. Shards are written first; `commit()` publishes them in the manifest.

    Use as a context manager: on a clean exit pending rows are flushed and committed; on an
    error nothing new is committed and the previous manifest stays as it was. One writer at
    a time holds the cache's lock. Right after taking it, the writer stamps the manifest with
    its run id (a compare-and-swap), and every commit is a compare-and-swap on the version it
    last wrote: a writer whose lock was taken can commit nothing after the new holder's stamp.
    """

    def __init__(self, url: str, spec: CacheSpec, storage_options: dict | None = None, shard_rows: int = 1024,
                 lock_ttl: float = 600.0, upgrading: bool = False):
        self.url, self.storage_options, self.shard_rows = url, storage_options, shard_rows
        self._upgrading = upgrading
        self.fs, self.root = url_to_fs(url, storage_options)
        get_codec(spec.codec)
        self.lock = WriterLock(self.fs, self.root, ttl=lock_ttl)
        self.lock.acquire()
        self.run_id = self.lock.info["run_id"]
        try:
            self._fence(spec)
            self._remove_orphans()
        except BaseException:
            self.lock.release()
            raise
        self.spec = self.manifest.spec
        self._pending: list[Written] = []
        self._buf: list[tuple] = []
        self._seq = 0

    def _fence(self, spec: CacheSpec) -> None:
        """Stamp the manifest with this run, so that the previous holder's next commit fails."""
        prev = self.lock.replaced
        for _ in range(10):
            data, self._etag = read_versioned(self.fs, f"{self.root}/{MANIFEST_NAME}")
            if data is None:
                self.manifest = Manifest(spec=spec)
                if prev is None or self.lock.ended(prev):
                    return  # nobody can commit: no manifest until this writer's first commit
                # A holder judged stale by its age may still live and create the manifest: create it first.
            else:
                self.manifest = Manifest.from_json(data, f"{self.url}/{MANIFEST_NAME}", upgrading=self._upgrading)
                self.manifest.spec.check(spec, self.url, check_codec=True)
            try:
                return self._put(replace(self.manifest, writer=self.run_id))
            except LockLostError:
                continue  # the previous holder committed just now: stamp that version
        raise CacheLockedError(f"the manifest of {self.url} keeps changing while taking the lock; another writer is active")

    def _put(self, manifest: Manifest) -> None:
        """Replace the manifest if it is still the version this writer saw last (else LockLostError)."""
        if not self.lock.held:
            raise LockLostError(f"run {self.run_id} no longer holds the lock of {self.url}; nothing was committed")
        try:
            self._etag = put_if(self.fs, f"{self.root}/{MANIFEST_NAME}", manifest.to_json(), self._etag)
        except PreconditionFailed:
            raise LockLostError(
                f"the manifest of {self.url} was changed by another writer: run {self.run_id} lost its lock and "
                f"committed nothing more (what it committed earlier stays); re-run to complete the cache"
            ) from None
        self.manifest = manifest

    def _remove_orphans(self) -> None:
        """Delete unlisted shards and index segments no writer can still commit: those of the run whose ended
        lock this writer took, and any older than the lock's stale timeout. A live writer's fresh files stay,
        and so do segments a reader of an older generation may still be reading (until the timeout)."""
        listed = {p.rsplit("/", 1)[-1] for p in [s.path for s in self.manifest.shards] + [s.path for s in self.manifest.index]}
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
                if name in listed or parts[0] != prefix or len(parts) < 3 or parts[1] == self.run_id:
                    continue
                if parts[1] == ended or time.time() - _mtime(f) > self.lock.ttl:
                    try:
                        self.fs.rm_file(f["name"])
                    except FileNotFoundError:
                        pass

    def reader(self) -> "CacheReader":
        """A reader of what this writer has committed so far."""
        return CacheReader(self.url, self.manifest, self.storage_options)

    def next_shard_name(self) -> str:
        self._seq += 1
        return f"part-{self.run_id}-{self._seq:05d}.parquet"

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
        self.lock.heartbeat()

    def count_skipped(self, reason: str, n: int = 1) -> None:
        self.manifest.skipped[reason] = self.manifest.skipped.get(reason, 0) + n

    def commit(self) -> Manifest:
        """Publish every shard written so far, with its index segment; readers see all of them or none."""
        m = self.manifest
        shards = [replace(w.info, id=m.next_id + i) for i, w in enumerate(self._pending)]
        index = list(m.index)
        if shards:
            entries = [shard_entries(w.digests, s.id, w.lengths, s.group_rows) for w, s in zip(self._pending, shards)]
            index.append(self._write_segment(entries, m.generation + 1))
            merge = merge_plan(index)
            if merge:  # too many segments: the smaller ones become one (their files go with orphan clean-up)
                old = Index(self.fs, self.root, merge, self.url).entries()
                index = [s for s in index if s not in merge] + [self._write_segment([old], m.generation + 1, "m")]
        self._put(self._next(m.shards + shards, index, m.next_id + len(shards)))
        self._pending = []
        self.lock.heartbeat()
        return self.manifest

    def _write_segment(self, entries: list[pa.Table], generation: int, tag: str = "") -> SegmentInfo:
        data, footer, rows = segment_bytes(entries)
        rel = f"index/seg-{self.run_id}-{generation:08d}{tag}.idx"
        if is_local(self.fs):
            self.fs.makedirs(f"{self.root}/index", exist_ok=True)
        put_atomic(self.fs, f"{self.root}/{rel}", data)
        return SegmentInfo(rel, rows, len(data), hashlib.sha256(data).hexdigest(), footer)

    def _next(self, shards: list[ShardInfo], index: list[SegmentInfo], next_id: int | None = None) -> Manifest:
        return replace(self.manifest, shards=shards, index=index, generation=self.manifest.generation + 1,
                       updated=time.time(), writer=self.run_id,
                       next_id=self.manifest.next_id if next_id is None else next_id)

    def drop(self, paths: set[str]) -> Manifest:
        """Remove shards from the manifest in one commit (the index rebuilt without them), then delete their files."""
        keep = [s for s in self.manifest.shards if s.path not in paths]
        entries = rebuild_entries(self.reader(), keep)
        self._put(self._next(keep, [self._write_segment([entries], self.manifest.generation + 1, "r")] if keep else []))
        for p in paths:
            try:
                self.fs.rm_file(f"{self.root}/{p}")
            except FileNotFoundError:
                pass
        self.lock.heartbeat()
        return self.manifest

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


class CacheReader:
    """Read access to a committed cache: locate keys through the index, read only the row groups that hold them.

    Every read is checked: a shard's footer against the manifest, and each page read against its CRC.
    `verify` checks whole files against their sha256.
    """

    def __init__(self, url: str, manifest: Manifest, storage_options: dict | None = None):
        self.url, self.manifest, self.storage_options = url, manifest, storage_options
        self.fs, self.root = url_to_fs(url, storage_options)
        self.spec = manifest.spec
        self.codec = get_codec(self.spec.codec)
        self.index = Index(self.fs, self.root, manifest.index, url)
        self.shards = {s.id: s for s in manifest.shards}
        self._files: OrderedDict[int, PartialFile] = OrderedDict()  # checked footers, the most recent OPEN_FILES

    def shard_url(self, shard: ShardInfo) -> str:
        return f"{self.url.rstrip('/')}/{shard.path}"

    def file(self, shard: ShardInfo) -> PartialFile:
        f = self._files.pop(shard.id, None)
        if f is None:
            f = PartialFile(self.fs, f"{self.root}/{shard.path}", shard.bytes, shard.footer_sha256, f"shard {shard.path} of {self.url}")
        self._files[shard.id] = f
        if len(self._files) > OPEN_FILES:  # a long-lived reader (a predictor actor) stays bounded
            self._files.popitem(last=False)
        return f

    # ---------------------------------------------------------------- by key

    def locate(self, keys) -> pa.Table:
        """Index entries (key, shard, group, row, length) of the keys the cache holds; absent keys are left out."""
        return self.index.locate(list(keys))

    def contains(self, keys) -> set[str]:
        return set(self.locate(keys).column("key").to_pylist())

    def by_shard(self, locs: pa.Table) -> Iterator[tuple[ShardInfo, np.ndarray]]:
        """(shard, positions in `locs`) for every shard `locs` points into: the unit of a parallel read."""
        shard = locs.column("shard").to_numpy()
        for sid in np.unique(shard):
            yield self.shards[int(sid)], np.flatnonzero(shard == sid)

    def read_located(self, locs: pa.Table, columns: list[str]) -> pa.Table:
        """The rows `locs` (from `locate`) point at, in `locs` order, `columns` plus key."""
        cols = list(dict.fromkeys(["key", *columns]))
        if locs.num_rows == 0:
            return SCHEMA.empty_table().select(cols)
        groups, rows, keys = locs.column("group").to_numpy(), locs.column("row").to_numpy(), locs.column("key")
        parts, order = [], []
        for shard, sel in self.by_shard(locs):
            parts.append(self.read_rows(shard, groups[sel], rows[sel], cols, keys.take(sel)))
            order.append(sel)
        return pa.concat_tables(parts).take(np.argsort(np.concatenate(order), kind="stable"))

    def read_rows(self, shard: ShardInfo, groups, rows, columns: list[str], keys=None) -> pa.Table:
        """Rows (group, row) of one shard, in the given order; fetches only their row groups.

        With `keys` (the keys the index says are there), the rows read are checked to be those keys.
        """
        groups, rows = np.asarray(groups, np.int64), np.asarray(rows, np.int64)
        f = self.file(shard)
        need = np.unique(groups)
        sizes = np.array([f.metadata.row_group(int(g)).num_rows for g in need])
        start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        cols = list(dict.fromkeys(["key", *columns])) if keys is not None else columns
        t = f.read(need.tolist(), cols).take(start[np.searchsorted(need, groups)] + rows)
        if keys is not None and t.column("key").to_pylist() != list(keys.to_pylist() if hasattr(keys, "to_pylist") else keys):
            raise CacheCorruptError(f"the key index of {self.url} does not match shard {shard.path}; repair it (`er cache repair`)")
        return t

    def load(self, keys: Iterable[str] | None = None) -> "CachedRows":
        """The rows of the given keys (those the cache holds; all rows if None), still encoded; decode per batch later."""
        cols = ["key", "length", "input_ids", "hidden", "scale"]
        if keys is None:
            parts = list(self.iter_tables(cols))
            return CachedRows(pa.concat_tables(parts) if parts else SCHEMA.empty_table().select(cols), self.spec)
        return CachedRows(self.read_located(self.locate(keys), cols), self.spec)

    # ---------------------------------------------------------------- whole shards

    def read_shard(self, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """Every row of a shard (`columns` only): used by checks and upgrades, never by training or prediction."""
        f = self.file(shard)
        return f.read(range(f.metadata.num_row_groups), columns or SCHEMA.names)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for s in self.manifest.shards:
            yield self.read_shard(s, columns)

    def keys(self) -> Iterator[str]:
        """Every cached key, from the shards' key columns only."""
        for t in self.iter_tables(["key"]):
            yield from t.column("key").to_pylist()

    def check(self, shard: ShardInfo) -> str | None:
        """What is wrong with one shard (missing, checksum, unreadable, row count), or None."""
        try:
            data = read_bytes(self.fs, f"{self.root}/{shard.path}")
        except FileNotFoundError:
            return f"shard {shard.path} listed in the manifest of {self.url} is missing"
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            return f"shard {shard.path} of {self.url} fails its checksum"
        try:
            rows = self.read_shard(shard, ["key"]).num_rows
        except CacheCorruptError as e:
            return str(e)
        if rows != shard.rows:
            return f"shard {shard.path}: {rows} rows, manifest says {shard.rows}"
        return None

    def bad_shards(self) -> list[tuple[ShardInfo, str]]:
        return [(s, p) for s in self.manifest.shards if (p := self.check(s))]

    def index_problems(self) -> list[str]:
        """Index segments that fail their checksum, or entries that do not match the shards' row counts."""
        problems = []
        for seg in self.manifest.index:
            try:
                data = read_bytes(self.fs, f"{self.root}/{seg.path}")
            except FileNotFoundError:
                problems.append(f"index segment {seg.path} of {self.url} is missing")
                continue
            if hashlib.sha256(data).hexdigest() != seg.sha256:
                problems.append(f"index segment {seg.path} of {self.url} fails its checksum")
        if not problems:
            counts = Counter(self.index.entries(["shard"]).column("shard").to_pylist())
            for s in self.manifest.shards:
                if counts.get(s.id, 0) != s.rows:
                    problems.append(f"index of {self.url} lists {counts.get(s.id, 0)} rows of shard {s.path}, which has {s.rows}")
        return problems

    def verify(self) -> list[str]:
        """Check every shard and index segment (presence, checksum, row counts); return the problems found."""
        return [p for _, p in self.bad_shards()] + self.index_problems()

    def decode(self, length: int, hidden: bytes, scale: bytes | None) -> np.ndarray:
        return self.codec.decode(hidden, scale, (length, self.spec.hidden_size))


class CachedRows:
    """Encoded cache rows in memory, indexed by key; `hidden(i)` decodes one to float32.

    It holds no reader (only the codec and H), so it pickles small: Ray ships it to workers as is.
    """

    def __init__(self, table: pa.Table, spec: CacheSpec):
        self.codec, self.hidden_size = spec.codec, spec.hidden_size
        self.keys = table.column("key").to_pylist()
        self.lengths = np.asarray(table.column("length").to_numpy(), dtype=np.int64)
        self.input_ids = table.column("input_ids").to_pylist()
        self._hidden = table.column("hidden").to_pylist()
        self._scale = table.column("scale").to_pylist()
        self.index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def hidden(self, i: int) -> np.ndarray:
        return get_codec(self.codec).decode(self._hidden[i], self._scale[i], (int(self.lengths[i]), self.hidden_size))


def open_cache(
    url: str,
    expect: CacheSpec | None = None,
    storage_options: dict | None = None,
    manifest: Manifest | None = None,
) -> CacheReader:
    """Open a committed cache (one manifest read); with `expect`, refuse it unless model, layer and tokenizer match."""
    if manifest is None:
        fs, root = url_to_fs(url, storage_options)
        manifest = _load_manifest(fs, root)
        if manifest is None:
            raise ErError(f"no er cache at {url} (no {MANIFEST_NAME}); create one with `er ingest ... --cache {url}`")
    if expect is not None:
        manifest.spec.check(expect, url)
    return CacheReader(url, manifest, storage_options)


def rebuild_entries(reader: CacheReader, shards: list[ShardInfo]) -> pa.Table:
    """Index entries of `shards`: from the index if it is sound, else from the shards' own key and length columns."""
    ids = pa.array([s.id for s in shards], pa.int32())
    if not reader.index_problems():
        t = reader.index.entries()
        return t.filter(pc.is_in(t.column("shard"), value_set=ids))
    parts = []
    for s in shards:
        t = reader.read_shard(s, ["key", "length"])
        parts.append(shard_entries(key_digests(t.column("key").to_pylist()), s.id, t.column("length").to_numpy(), s.group_rows))
    return pa.concat_tables(parts) if parts else shard_entries(key_digests([]), 0, [], 1)


def upgrade_cache(url: str, storage_options: dict | None = None, progress=None) -> dict:
    """Rewrite an older cache as the current format, in place and in one commit, under the writer lock.

    Format 1: each shard is read whole once, checked against its sha256 and rewritten in row groups with
    page checksums, and the key index is built. Format 2: the key index is rewritten from the old one
    (checked against its sha256); shards stay. Old files are deleted after the commit. Keys, states and
    spec are unchanged, so trained models and tasks keep working. A current cache is left as is.
    """
    fs, root = url_to_fs(url, storage_options)
    try:
        old = Manifest.from_json(read_bytes(fs, f"{root}/{MANIFEST_NAME}"), f"{url}/{MANIFEST_NAME}", upgrading=True)
    except FileNotFoundError:
        raise ErError(f"no er cache at {url} (no {MANIFEST_NAME})") from None
    if old.format_version == FORMAT_VERSION:
        return {"url": url, "upgraded": False, "format_version": FORMAT_VERSION, "shards": len(old.shards)}
    writer = CacheWriter(url, old.spec, storage_options, upgrading=True)
    try:
        m = writer.manifest
        old_files = [s.path for s in m.index]
        if m.format_version == 1:
            old_files += [s.path for s in m.shards]
            for i, s in enumerate(m.shards):
                table = pq.read_table(pa.BufferReader(_checked(fs, root, s.path, s.sha256, url))).select(SCHEMA.names).cast(SCHEMA)
                writer.add_shard(write_shard(url, writer.next_shard_name(), table, storage_options))
                if progress:
                    progress(i + 1, len(m.shards))
            writer.manifest = replace(m, shards=[], index=[], format_version=FORMAT_VERSION)  # the rewritten shards replace them all
            writer.commit()
        else:
            entries = [pq.read_table(pa.BufferReader(_checked(fs, root, s.path, s.sha256, url))).select(INDEX_SCHEMA.names)
                       for s in m.index]
            index = [writer._write_segment(entries, m.generation + 1, "u")] if m.shards else []
            writer._put(replace(writer._next(m.shards, index), format_version=FORMAT_VERSION))
        for p in old_files:
            try:
                fs.rm_file(f"{root}/{p}")
            except FileNotFoundError:
                pass
    finally:
        writer.abort()
    return {"url": url, "upgraded": True, "format_version": FORMAT_VERSION, "from_version": old.format_version,
            "shards": len(old.shards), "rows": sum(s.rows for s in old.shards)}


def _checked(fs, root: str, path: str, sha256: str, url: str) -> bytes:
    raw = read_bytes(fs, f"{root}/{path}")
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise CacheCorruptError(f"{path} of {url} fails its checksum; nothing was upgraded "
                                f"(re-ingest into a new cache, or repair it with the er that wrote it)")
    return raw


def repair_cache(url: str, storage_options: dict | None = None) -> dict:
    """Drop bad or missing shards from the manifest in one commit, under the writer lock, and delete their files.

    The key index is rebuilt in the same commit (from the shards if it is damaged itself). Returns
    what was dropped and how many examples (rows) they held: a re-ingest of the same corpus
    recomputes exactly those, since their keys are no longer in the cache.
    """
    spec = open_cache(url, storage_options=storage_options).spec
    writer = CacheWriter(url, spec, storage_options)
    try:
        reader = writer.reader()
        bad, index_bad = reader.bad_shards(), reader.index_problems()
        if bad or index_bad:
            writer.drop({s.path for s, _ in bad})
    finally:
        writer.abort()
    return {
        "url": url,
        "shards_checked": len(writer.manifest.shards) + len(bad),
        "dropped": [{"path": s.path, "rows": s.rows, "problem": p} for s, p in bad],
        "index_rebuilt": index_bad,
        "rows_to_reingest": sum(s.rows for s, _ in bad),
        "generation": writer.manifest.generation,
    }
