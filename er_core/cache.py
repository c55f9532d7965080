"""The recycled-embedding cache: Parquet shards of ragged layer-k states plus a manifest.

Layout under the cache URL (a local folder or `s3://bucket/prefix`):

    manifest.json                 committed last; lists every valid shard and its sha256
    shards/part-<run>-<n>.parquet one row per example: key, length, input_ids, hidden, scale, truncated
    _writer.lock                  names the writer holding the cache (or the last one, marked released)

Rows hold real tokens only (no padding). `hidden` is the codec's raw little-endian bytes of a
(length, H) array; decode with `np.frombuffer(hidden, dtype).reshape(length, H)` (see codecs.py),
so pandas, pyarrow and DuckDB read the files as they are.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import replace
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .codecs import get_codec
from .errors import CacheCorruptError, CacheLockedError, ErError, LockLostError
from .manifest import MANIFEST_NAME, CacheSpec, Manifest, ShardInfo
from .storage import PreconditionFailed, WriterLock, put_atomic, put_if, read_bytes, read_versioned, url_to_fs

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
    """Build one shard's table from per-example float32 (length, H) arrays."""
    c = get_codec(codec)
    payloads, scales = zip(*(c.encode(np.asarray(h, dtype=np.float32)) for h in hidden)) if hidden else ((), ())
    return pa.table(
        {
            "key": pa.array(list(keys), pa.string()),
            "length": pa.array([len(x) for x in input_ids], pa.int32()),
            "input_ids": pa.array([np.asarray(x, dtype=np.int32) for x in input_ids], pa.list_(pa.int32())),
            "hidden": pa.array(list(payloads), pa.binary()),
            "scale": pa.array(list(scales), pa.binary()),
            "truncated": pa.array([bool(t) for t in truncated], pa.bool_()),
        },
        schema=SCHEMA,
    )


def write_shard(url: str, name: str, table: pa.Table, storage_options: dict | None = None) -> ShardInfo:
    """Write a shard file (not yet committed) and return its manifest entry."""
    fs, root = url_to_fs(url, storage_options)
    buf = io.BytesIO()
    # States are near-incompressible floats: store them plain, compress only keys and ids.
    pq.write_table(
        table,
        buf,
        compression={"key": "zstd", "length": "zstd", "input_ids": "zstd", "hidden": "none", "scale": "none", "truncated": "zstd"},
        row_group_size=256,
        use_dictionary=False,
    )
    data = buf.getvalue()
    rel = f"shards/{name}"
    fs.makedirs(f"{root}/shards", exist_ok=True)
    put_atomic(fs, f"{root}/{rel}", data)
    lengths = table.column("length").to_numpy()
    return ShardInfo(
        path=rel,
        rows=table.num_rows,
        tokens=int(lengths.sum()),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
    )


def _arrow_owned(data: bytes) -> pa.Buffer:
    """A copy of `data` in Arrow's memory. Arrow frees buffers on its own threads, and freeing one that wraps a
    Python object takes the GIL: at interpreter exit that thread is killed inside a noexcept destructor and
    the process aborts ("terminate called without an active exception", exit 134, seen in `er cache verify`)."""
    buf = pa.allocate_buffer(len(data))
    memoryview(buf).cast("B")[:] = data
    return buf


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
                 lock_ttl: float = 600.0):
        self.url, self.storage_options, self.shard_rows = url, storage_options, shard_rows
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
        self._pending: list[ShardInfo] = []
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
                self.manifest = Manifest.from_json(data, f"{self.url}/{MANIFEST_NAME}")
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
        """Delete unlisted shards no writer can still commit: those of the run whose ended lock this writer
        took, and any older than the lock's stale timeout. A live writer's fresh shards stay."""
        listed = {s.path.rsplit("/", 1)[-1] for s in self.manifest.shards}
        prev = self.lock.replaced
        ended = prev.get("run_id") if prev and self.lock.ended(prev) else None
        try:
            files = self.fs.ls(f"{self.root}/shards", detail=True, refresh=True)
        except FileNotFoundError:
            return
        for f in files:
            name = f["name"].rstrip("/").rsplit("/", 1)[-1]
            parts = name.split("-")  # part-<run>-<n>.parquet
            if name in listed or parts[0] != "part" or len(parts) < 3 or parts[1] == self.run_id:
                continue
            if parts[1] == ended or time.time() - _mtime(f) > self.lock.ttl:
                try:
                    self.fs.rm_file(f["name"])
                except FileNotFoundError:
                    pass

    def existing_keys(self) -> set[str]:
        return set(open_cache(self.url, storage_options=self.storage_options, manifest=self.manifest).keys())

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

    def add_shard(self, info: ShardInfo) -> None:
        """Register a shard already written (e.g. by an ingestion actor) for the next commit."""
        self._pending.append(info)
        self.lock.heartbeat()

    def count_skipped(self, reason: str, n: int = 1) -> None:
        self.manifest.skipped[reason] = self.manifest.skipped.get(reason, 0) + n

    def commit(self) -> Manifest:
        """Publish every shard written so far; readers see all of them or none."""
        self._put(self._next(self.manifest.shards + self._pending))
        self._pending = []
        self.lock.heartbeat()
        return self.manifest

    def _next(self, shards: list[ShardInfo]) -> Manifest:
        return replace(self.manifest, shards=shards, generation=self.manifest.generation + 1, updated=time.time(),
                       writer=self.run_id)

    def drop(self, paths: set[str]) -> Manifest:
        """Remove shards from the manifest in one commit, then delete their files."""
        self._put(self._next([s for s in self.manifest.shards if s.path not in paths]))
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
    """Read access to a committed cache. Every shard read is checked against its manifest checksum."""

    def __init__(self, url: str, manifest: Manifest, storage_options: dict | None = None):
        self.url, self.manifest, self.storage_options = url, manifest, storage_options
        self.fs, self.root = url_to_fs(url, storage_options)
        self.spec = manifest.spec
        self.codec = get_codec(self.spec.codec)

    def shard_url(self, shard: ShardInfo) -> str:
        return f"{self.url.rstrip('/')}/{shard.path}"

    def read_shard(self, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        path = f"{self.root}/{shard.path}"
        try:
            data = read_bytes(self.fs, path)
        except FileNotFoundError:
            raise CacheCorruptError(f"shard {shard.path} listed in the manifest of {self.url} is missing") from None
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise CacheCorruptError(f"shard {shard.path} of {self.url} fails its checksum; refusing to read it (re-ingest it)")
        # No read-ahead either: nothing of this read is left on Arrow's threads once it returns.
        return pq.read_table(pa.BufferReader(_arrow_owned(data)), columns=columns, pre_buffer=False)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for s in self.manifest.shards:
            yield self.read_shard(s, columns)

    def keys(self) -> Iterator[str]:
        for t in self.iter_tables(["key"]):
            yield from t.column("key").to_pylist()

    def check(self, shard: ShardInfo) -> str | None:
        """What is wrong with one shard (missing, checksum, unreadable, row count), or None."""
        try:
            t = self.read_shard(shard, ["key", "length"])
        except (CacheCorruptError, pa.ArrowException) as e:  # storage faults propagate: they say nothing of the shard
            return str(e)
        if t.num_rows != shard.rows:
            return f"shard {shard.path}: {t.num_rows} rows, manifest says {shard.rows}"
        return None

    def bad_shards(self) -> list[tuple[ShardInfo, str]]:
        return [(s, p) for s in self.manifest.shards if (p := self.check(s))]

    def verify(self) -> list[str]:
        """Check every shard (presence, checksum, row count); return the problems found."""
        return [p for _, p in self.bad_shards()]

    def decode(self, length: int, hidden: bytes, scale: bytes | None) -> np.ndarray:
        return self.codec.decode(hidden, scale, (length, self.spec.hidden_size))

    def load(self, keys: Iterable[str] | None = None) -> "CachedRows":
        """Load rows (all, or those with the given keys) still encoded; decode per batch later."""
        wanted = None if keys is None else set(keys)
        parts = []
        for t in self.iter_tables():
            if wanted is not None:
                t = t.filter(pc.is_in(t.column("key"), pa.array(list(wanted), pa.string())))
            parts.append(t)
        table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        return CachedRows(table, self)


class CachedRows:
    """Encoded cache rows in memory, indexed by key; `hidden(i)` decodes one to float32."""

    def __init__(self, table: pa.Table, reader: CacheReader):
        self.reader = reader
        self.keys = table.column("key").to_pylist()
        self.lengths = np.asarray(table.column("length").to_numpy(), dtype=np.int64)
        self.input_ids = table.column("input_ids").to_pylist()
        self._hidden = table.column("hidden").to_pylist()
        self._scale = table.column("scale").to_pylist()
        self.index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def hidden(self, i: int) -> np.ndarray:
        return self.reader.decode(int(self.lengths[i]), self._hidden[i], self._scale[i])


def open_cache(
    url: str,
    expect: CacheSpec | None = None,
    storage_options: dict | None = None,
    manifest: Manifest | None = None,
) -> CacheReader:
    """Open a committed cache; with `expect`, refuse it unless model, layer and tokenizer match."""
    if manifest is None:
        fs, root = url_to_fs(url, storage_options)
        manifest = _load_manifest(fs, root)
        if manifest is None:
            raise ErError(f"no er cache at {url} (no {MANIFEST_NAME}); create one with `er ingest ... --cache {url}`")
    if expect is not None:
        manifest.spec.check(expect, url)
    return CacheReader(url, manifest, storage_options)


def repair_cache(url: str, storage_options: dict | None = None) -> dict:
    """Drop bad or missing shards from the manifest in one commit, under the writer lock, and delete their files.

    Returns what was dropped and how many examples (rows) they held: a re-ingest of the same corpus
    recomputes exactly those, since their keys are no longer in the cache.
    """
    spec = open_cache(url, storage_options=storage_options).spec
    writer = CacheWriter(url, spec, storage_options)
    try:
        bad = CacheReader(url, writer.manifest, storage_options).bad_shards()
        if bad:
            writer.drop({s.path for s, _ in bad})
    finally:
        writer.abort()
    return {
        "url": url,
        "shards_checked": len(writer.manifest.shards) + len(bad),
        "dropped": [{"path": s.path, "rows": s.rows, "problem": p} for s, p in bad],
        "rows_to_reingest": sum(s.rows for s, _ in bad),
        "generation": writer.manifest.generation,
    }
