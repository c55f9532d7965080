"""The key index: where each cached example lives, found without reading any hidden state.

An entry is (digest, shard, group, row, length): the 16-byte digest of the example's key, the id of
the shard holding it, the row group and the row within it, and its token count. Each commit writes
the entries of the shards it adds as one segment, `index/seg-<generation>-<run>.parquet`, sorted
by digest in row groups of SEGMENT_GROUP_ROWS entries with min/max statistics. Locating N keys
reads each segment's footer and only the row groups whose digest range holds one of them, so the
bytes read grow with N and the number of segments, never with the hidden states. An Index fetches each
row group once and keeps it (up to CACHED_ENTRIES entries), so lookups one after another (a task's
splits, a predictor's batches) do not fetch the same index bytes again. Like an LSM tree,
a commit that leaves more than MAX_SEGMENTS segments merges the smaller half into one, so lookups
open a bounded number of files however many commits a cache has seen.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .parquet_io import PartialFile, to_parquet

SEGMENT_GROUP_ROWS = 4096
MAX_SEGMENTS = 8
CACHED_ENTRIES = 1_000_000  # index entries an Index keeps after reading them (about 32 MB), least recently used dropped
SCHEMA = pa.schema([("digest", pa.binary(16)), ("shard", pa.int32()), ("group", pa.int32()), ("row", pa.int32()),
                    ("length", pa.int32())])


@dataclass(frozen=True)
class SegmentInfo:
    path: str  # relative to the cache root
    rows: int
    bytes: int
    sha256: str
    footer_sha256: str


def key_digests(keys: Iterable[str]) -> np.ndarray:
    """16-byte digests of keys (numpy S16): fixed size whatever the key (content hash or user id)."""
    out = [hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys]
    return np.array(out, dtype="S16") if out else np.empty(0, dtype="S16")


def digest_array(d: np.ndarray) -> pa.FixedSizeBinaryArray:
    d = np.ascontiguousarray(d, dtype="S16")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(d), [None, pa.py_buffer(d.tobytes())])


def digests_of(col) -> np.ndarray:
    """A digest column as numpy S16 (no per-row Python)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.empty(0, dtype="S16")
    return np.frombuffer(arr.buffers()[1], dtype="S16", count=len(arr), offset=arr.offset * 16).copy()


def shard_entries(digests: np.ndarray, shard: int, lengths, group_rows: int) -> pa.Table:
    """Index entries of one shard whose rows are in `digests` order, in row groups of `group_rows`."""
    n = len(digests)
    pos = np.arange(n, dtype=np.int32)
    return pa.table({"digest": digest_array(digests), "shard": pa.array(np.full(n, shard, np.int32)),
                     "group": pa.array(pos // group_rows), "row": pa.array(pos % group_rows),
                     "length": pa.array(np.asarray(lengths, dtype=np.int32))}, schema=SCHEMA)


def segment_bytes(entries: list[pa.Table]) -> tuple[bytes, str, int]:
    """One segment file from entry tables: (file bytes, footer digest, rows)."""
    t = pa.concat_tables(entries).sort_by("digest") if entries else SCHEMA.empty_table()
    data, footer = to_parquet(t, SEGMENT_GROUP_ROWS, "zstd", statistics=["digest"])
    return data, footer, t.num_rows


class Index:
    """The segments of one manifest generation, opened lazily (a footer each)."""

    def __init__(self, fs, root: str, segments: list[SegmentInfo], url: str):
        self.fs, self.root, self.segments, self.url = fs, root, list(segments), url
        self._files: dict[str, PartialFile] = {}
        self._groups: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()  # (segment, row group) -> its entries
        self._kept = 0

    def file(self, seg: SegmentInfo) -> PartialFile:
        f = self._files.get(seg.path)
        if f is None:
            f = self._files[seg.path] = PartialFile(self.fs, f"{self.root}/{seg.path}", seg.bytes, seg.footer_sha256,
                                                    f"index segment {seg.path} of {self.url}")
        return f

    def locate(self, keys: list[str]) -> pa.Table:
        """The entries of the given keys that the cache holds, with a `key` column; absent keys are left out."""
        keys = list(dict.fromkeys(keys))
        if not keys or not self.segments:
            return SCHEMA.append(pa.field("key", pa.string())).empty_table()
        dig = key_digests(keys)
        order = np.argsort(dig)
        wanted = dig[order]
        found = []
        for seg in self.segments:
            f = self.file(seg)
            groups = [g for g in range(f.metadata.num_row_groups) if _may_hold(f.metadata.row_group(g).column(0), wanted)]
            if groups:
                t = self._read_groups(seg, f, groups)
                found.append(t.filter(pc.is_in(t.column("digest"), value_set=digest_array(wanted))))
        t = pa.concat_tables(found) if found else SCHEMA.empty_table()
        got = digests_of(t.column("digest"))
        pos = order[np.searchsorted(wanted, got)]  # back to the caller's keys
        return t.append_column("key", pa.array([keys[i] for i in pos], pa.string()))

    def _read_groups(self, seg: SegmentInfo, f: PartialFile, groups: list[int]) -> pa.Table:
        """The entries of row groups `groups` of a segment, fetching only those this Index does not hold yet."""
        need = [g for g in groups if (seg.path, g) not in self._groups]
        if need:
            t, start = f.read(need, SCHEMA.names), 0
            for g in need:
                n = f.metadata.row_group(g).num_rows
                self._groups[(seg.path, g)] = t.slice(start, n)
                self._kept, start = self._kept + n, start + n
        for g in groups:
            self._groups.move_to_end((seg.path, g))
        out = pa.concat_tables([self._groups[(seg.path, g)] for g in groups])
        while self._kept > CACHED_ENTRIES and len(self._groups) > len(groups):  # never the groups just used
            self._kept -= self._groups.popitem(last=False)[1].num_rows
        return out

    def entries(self, columns: list[str] | None = None) -> pa.Table:
        """Every entry (for key claims, merges and checks): index bytes only, never hidden states."""
        cols = columns or SCHEMA.names
        parts = [self.file(s).read(range(self.file(s).metadata.num_row_groups), cols) for s in self.segments]
        return pa.concat_tables(parts) if parts else SCHEMA.empty_table().select(cols)

    def digests(self) -> np.ndarray:
        return digests_of(self.entries(["digest"]).column("digest"))


def _may_hold(col_meta, wanted: np.ndarray) -> bool:
    st = col_meta.statistics
    if st is None or not st.has_min_max:
        return True
    lo, hi = np.array([st.min], dtype="S16")[0], np.array([st.max], dtype="S16")[0]
    return bool(np.searchsorted(wanted, lo, "left") < np.searchsorted(wanted, hi, "right"))


def merge_plan(segments: list[SegmentInfo]) -> list[SegmentInfo]:
    """The segments to merge into one after a commit: none, or the smaller half when there are too many."""
    if len(segments) <= MAX_SEGMENTS:
        return []
    return sorted(segments, key=lambda s: s.rows)[: len(segments) // 2 + 1]
