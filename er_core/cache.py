"""The recycled-embedding cache: Parquet shards of ragged layer-k states plus a manifest.

Layout under the cache URL (a local folder or `s3://bucket/prefix`):

    manifest.json                 committed last; lists every valid shard and its sha256
    shards/part-<run>-<n>.parquet one row per example: key, length, input_ids, hidden, scale, truncated
    _writer.lock                  present while a writer runs

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
from .errors import CacheCorruptError, ErError
from .manifest import MANIFEST_NAME, CacheSpec, Manifest, ShardInfo
from .storage import WriterLock, put_atomic, read_bytes, url_to_fs

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


def _load_manifest(fs, root: str) -> Manifest | None:
    try:
        data = read_bytes(fs, f"{root}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, f"{root}/{MANIFEST_NAME}")


class CacheWriter:
    """Adds rows to a cache. Shards are written first; `commit()` publishes them in the manifest.

    Use as a context manager: on a clean exit pending rows are flushed and committed; on an
    error nothing new is committed and the previous manifest stays as it was. One writer at
    a time holds the cache's lock; shards left by a crashed writer are removed on next open.
    """

    def __init__(self, url: str, spec: CacheSpec, storage_options: dict | None = None, shard_rows: int = 1024):
        self.url, self.storage_options, self.shard_rows = url, storage_options, shard_rows
        self.fs, self.root = url_to_fs(url, storage_options)
        get_codec(spec.codec)
        self.lock = WriterLock(self.fs, self.root)
        self.lock.acquire()
        try:
            existing = _load_manifest(self.fs, self.root)
            if existing is not None:
                existing.spec.check(spec, url, check_codec=True)
                self.manifest = existing
            else:
                self.fs.makedirs(self.root, exist_ok=True)
                self.manifest = Manifest(spec=spec)
            self._remove_orphans()
        except BaseException:
            self.lock.release()
            raise
        self.spec = self.manifest.spec
        self.run_id = self.lock.info["run_id"]
        self._pending: list[ShardInfo] = []
        self._buf: list[tuple] = []
        self._seq = 0

    def _remove_orphans(self) -> None:
        listed = {f"{self.root}/{s.path}" for s in self.manifest.shards}
        try:
            files = self.fs.ls(f"{self.root}/shards", detail=False)
        except FileNotFoundError:
            return
        for f in files:
            f = f.rstrip("/")
            name = f.rsplit("/", 1)[-1]
            if f"{self.root}/shards/{name}" not in listed:
                self.fs.rm_file(f)

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
        current = _load_manifest(self.fs, self.root)
        if current is not None and current.generation != self.manifest.generation:
            raise CacheCorruptError(
                f"manifest of {self.url} changed under this writer (generation {self.manifest.generation} -> "
                f"{current.generation}); another writer ignored the lock. Nothing was committed; re-run ingestion."
            )
        self.manifest = replace(
            self.manifest,
            shards=self.manifest.shards + self._pending,
            generation=self.manifest.generation + 1,
            updated=time.time(),
        )
        put_atomic(self.fs, f"{self.root}/{MANIFEST_NAME}", self.manifest.to_json())
        self._pending = []
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
        return pq.read_table(io.BytesIO(data), columns=columns)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for s in self.manifest.shards:
            yield self.read_shard(s, columns)

    def keys(self) -> Iterator[str]:
        for t in self.iter_tables(["key"]):
            yield from t.column("key").to_pylist()

    def verify(self) -> list[str]:
        """Check every shard (presence, checksum, row count); return the problems found."""
        problems = []
        for s in self.manifest.shards:
            try:
                t = self.read_shard(s, ["key", "length"])
                if t.num_rows != s.rows:
                    problems.append(f"shard {s.path}: {t.num_rows} rows, manifest says {s.rows}")
            except (CacheCorruptError, OSError, pa.ArrowException) as e:
                problems.append(str(e))
        return problems

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
