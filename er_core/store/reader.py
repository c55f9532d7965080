"""Reading a cache at one version: locate keys through the index, fetch exactly the bytes of their rows.

A reader needs the state it was opened at (`Manifest`: spec and index segments, ~200 bytes each), never a list of
shards: an index entry names its shard file and the byte offsets of its row (index.py). Every read is checked:
index buckets against their crc, each row's bytes against the crc its entry holds, whole shards (checks,
compaction) against their footer digest and page checksums; `verify` checks whole files against their checksums.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter, OrderedDict
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..errors import CacheCorruptError, ErError
from . import log as commit_log
from .codecs import get_codec
from .index import Index, shard_path
from .manifest import CacheSpec, Manifest, ShardInfo
from .parquet_io import PartialFile, fetch_spans
from .storage import read_bytes, url_to_fs
from .writer import SCHEMA, file_checksum

OPEN_FILES = 256  # shard footers a whole-shard reader keeps (a few KB each)


class CacheReader:
    """Read access to one committed version of a cache."""

    def __init__(self, url: str, manifest: Manifest, storage_options: dict | None = None):
        self.url, self.manifest, self.storage_options = url, manifest, storage_options
        self.fs, self.root = url_to_fs(url, storage_options)
        self.spec = manifest.spec
        self.codec = get_codec(self.spec.codec)
        self.index = Index(self.fs, self.root, manifest.index, url, reopen=commit_log.LatestSegments(url, storage_options))
        self._files: OrderedDict[str, PartialFile] = OrderedDict()  # checked footers, the most recent OPEN_FILES
        self._shards: list[ShardInfo] | None = None

    @property
    def version(self) -> int:
        return self.manifest.generation

    def shards(self) -> list[ShardInfo]:
        """Every shard of this version, from the index segments' shard lists (checks, compaction, whole reads)."""
        if self._shards is None:
            self._shards = [ShardInfo(**s) for s in self.index.shards()]
        return self._shards

    # ---------------------------------------------------------------- by key

    def locate(self, keys) -> pa.Table:
        """Index entries of the keys the cache holds, with a `key` column; absent keys are left out."""
        return self.index.locate(list(keys))

    def contains(self, keys) -> set[str]:
        return set(self.locate(keys).column("key").to_pylist())

    def read_located(self, locs: pa.Table, columns: list[str]) -> pa.Table:
        """The rows `locs` (from `locate`) point at, in `locs` order: key plus `columns` of length, input_ids,
        hidden, scale. Fetches each row's own bytes (neighbours in one request), checked against its entry's crc."""
        cols = list(dict.fromkeys(["key", *columns]))
        bad = set(cols) - {"key", "length", "input_ids", "hidden", "scale"}
        if bad:
            raise ErError(f"row reads return key, length, input_ids, hidden and scale; not {sorted(bad)}")
        n = locs.num_rows
        length = locs.column("length").to_numpy().astype(np.int64)
        out = {"key": locs.column("key"), "length": locs.column("length")}
        names = locs.column("name").combine_chunks()
        raw = np.frombuffer(names.buffers()[1], "V12", n, names.offset * 12) if n else np.empty(0, "V12")
        states = "hidden" in cols or "scale" in cols
        width = self.codec.bytes_per_value * self.spec.hidden_size  # states only: scales are their own span
        sb = self.codec.scale_bytes_per_token
        hidden, scale, ids = [b""] * n, [None] * n, [b""] * n
        col = {c: locs.column(c).to_numpy() for c in ("hidden_at", "scale_at", "ids_at", "crc", "ids_crc")}
        for name in np.unique(raw):
            sel = np.flatnonzero(raw == name)
            path = shard_path(name.tobytes())
            where = f"shard {path} of {self.url}"
            spans, slots = [], []
            for i in sel.tolist():
                if states:
                    spans.append((int(col["hidden_at"][i]), int(col["hidden_at"][i]) + int(length[i]) * width))
                    slots.append(("hidden", i))
                    if sb:
                        spans.append((int(col["scale_at"][i]), int(col["scale_at"][i]) + int(length[i]) * sb))
                        slots.append(("scale", i))
                if "input_ids" in cols:
                    spans.append((int(col["ids_at"][i]), int(col["ids_at"][i]) + 4 * int(length[i])))
                    slots.append(("ids", i))
            for (what, i), data in zip(slots, fetch_spans(self.fs, f"{self.root}/{path}", spans, where)):
                {"hidden": hidden, "scale": scale, "ids": ids}[what][i] = data
            for i in sel.tolist():
                if states and zlib.crc32(scale[i] or b"", zlib.crc32(hidden[i])) != col["crc"][i]:
                    raise CacheCorruptError(f"{where} fails its checksum (row {i} of the read); refusing to use it "
                                            f"(`er cache repair`)")
                if "input_ids" in cols and zlib.crc32(ids[i]) != col["ids_crc"][i]:
                    raise CacheCorruptError(f"{where} fails its checksum (token ids); refusing to use it (`er cache repair`)")
        if "input_ids" in cols:
            offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
            values = np.frombuffer(b"".join(ids), "<i4")
            out["input_ids"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
        if "hidden" in cols:
            out["hidden"] = pa.array(hidden, pa.binary())
        if "scale" in cols:
            out["scale"] = pa.array(scale, pa.binary())
        return pa.table({c: out[c] for c in cols}).cast(pa.schema([SCHEMA.field(c) for c in cols]))

    def load(self, keys: Iterable[str] | None = None) -> "CachedRows":
        """The rows of the given keys (those the cache holds; all rows if None), still encoded; decode per batch later."""
        cols = ["key", "length", "input_ids", "hidden", "scale"]
        if keys is None:
            parts = list(self.iter_tables(cols))
            return CachedRows(pa.concat_tables(parts) if parts else SCHEMA.empty_table().select(cols), self.spec)
        return CachedRows(self.read_located(self.locate(keys), cols), self.spec)

    # ---------------------------------------------------------------- whole shards

    def file(self, shard: ShardInfo) -> PartialFile:
        f = self._files.pop(shard.path, None)
        if f is None:
            f = PartialFile(self.fs, f"{self.root}/{shard.path}", shard.bytes, shard.footer_sha256, f"shard {shard.path} of {self.url}")
        self._files[shard.path] = f
        if len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)
        return f

    def read_shard(self, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """Every row of a shard (`columns` only): checks, upgrades and compaction, never training or prediction."""
        f = self.file(shard)
        return f.read(range(f.metadata.num_row_groups), columns or SCHEMA.names)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for s in self.shards():
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
            return f"shard {shard.path} listed in the index of {self.url} is missing"
        if file_checksum(data) != shard.checksum:
            return f"shard {shard.path} of {self.url} fails its checksum"
        try:
            rows = self.read_shard(shard, ["key"]).num_rows
        except CacheCorruptError as e:
            return str(e)
        if rows != shard.rows:
            return f"shard {shard.path}: {rows} rows, the index says {shard.rows}"
        return None

    def bad_shards(self) -> list[tuple[ShardInfo, str]]:
        return [(s, p) for s in self.shards() if (p := self.check(s))]

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
            try:
                counts = Counter(self.index.entries(["shard"]).column("shard").to_pylist())
                shards = self.shards()
            except CacheCorruptError as e:
                return [str(e)]
            for s in shards:
                if counts.get(s.id, 0) != s.rows:
                    problems.append(f"index of {self.url} lists {counts.get(s.id, 0)} rows of shard {s.path}, which has {s.rows}")
        return problems

    def verify(self) -> list[str]:
        """Check every shard and index segment (presence, checksum, row counts); return the problems found."""
        problems = self.index_problems()
        try:
            return [p for _, p in self.bad_shards()] + problems
        except CacheCorruptError:
            return problems

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


def open_state(url: str, storage_options: dict | None = None, counter=None) -> Manifest | None:
    """The cache's latest version (None: no cache at `url`)."""
    fs, root = url_to_fs(url, storage_options)
    return commit_log.read_state(fs, root, url, counter)


def open_cache(url: str, expect: CacheSpec | None = None, storage_options: dict | None = None,
               manifest: Manifest | None = None) -> CacheReader:
    """Open a committed cache at its latest version (the last checkpoint and the commits after it); with `expect`,
    refuse it unless model, layer and tokenizer match. `manifest`: a version already opened (nothing is read)."""
    if manifest is None:
        manifest = open_state(url, storage_options)
        if manifest is None:
            raise ErError(f"no er cache at {url} (no commit log); create one with `er ingest ... --cache {url}`")
    if expect is not None:
        manifest.spec.check(expect, url)
    return CacheReader(url, manifest, storage_options)
