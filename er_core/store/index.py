"""The key index: where each cached example lives, down to its bytes, found without reading any hidden state.

An entry (RECORD, 60 bytes) holds the 16-byte digest of the example's key, the id of the shard holding
it, the shard's file name (`shards/part-<run>-<tag>.parquet`, 24 hex digits kept as 12 bytes), the byte offsets
of the row's token ids, states and scales in that file, a crc32 of the states and scales and one of the
token ids (so each read is checked on exactly what it fetched), its token count and its row in the shard. So a reader fetches one row's own bytes with nothing else read first: no
footer, no shard list (parquet_io.row_offsets says why the offsets are exact).

Each commit writes the entries of the shards it adds as one segment, `index/seg-<run>-<generation>.idx`:

    entries      rows x 60 bytes, sorted by digest (RECORD)
    buckets      (B + 1) x (start u32, crc32 u32): bucket b holds the entries whose digest starts with b
                 (its top `bits` bits, B = 2**bits, about BUCKET_ENTRIES entries each); the crc covers the
                 bucket's start, end and entries, so every bucket read is checked on its own
    shards       JSON list of the segment's shards (manifest.ShardInfo): what only checks, compaction and
                 repairs need, so opening a cache never reads a list of every shard
    bloom        a Bloom filter of the digests (BLOOM_BITS an entry, about 1% false positives): key claims,
                 whose keys are mostly new, skip the buckets of a segment that cannot hold them
    trailer      b"ERI4", bits (u32), rows (u64), shards' length (u64) and crc32 (u32), bloom's length (u64) and crc32 (u32)

Digests are hashes, so buckets are even. Locating N keys reads, per segment, the bucket table entries
and the buckets of those keys only (nearby ranges merged up to COALESCE bytes apart): bytes grow
with N, not with the segment; what grows with the cache is the number of segments until it is compacted.
The layout follows from the row count and file size in the manifest,
so opening a segment reads nothing. An Index keeps the buckets it fetched (up to CACHED_ENTRIES
entries) and the filters it read (up to CACHED_FILTER_BYTES, unless it claims keys, which ask every filter each
call), so lookups one after another (a task's splits, a predictor's batches) fetch them once.
Like an LSM tree, segments of one size tier merge once TIER of them exist (merge_plan), up to COMMIT_TIERS:
a commit's cost is the same in a cache of 100k rows or of 1B. Bigger segments are `er cache compact`'s to merge
(into one). A lookup of many keys reads a segment's Bloom filter instead of its buckets where that is fewer
bytes, so each segment an uncompacted cache gathers costs a lookup at most its filter (1.25 bytes an entry).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from bisect import bisect_right
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from ..errors import CacheCorruptError

BUCKET_ENTRIES = 16  # mean entries a bucket holds: the unit a lookup reads (about 1 KB)
COALESCE = 4096  # ranges closer than this are fetched in one request
TIER, TIER_BASE = 4, 8192  # segments merge TIER at a time, by size tier (a commit of 16 shards of 512 rows: 8k entries)
COMMIT_TIERS = 3  # commits merge tiers 0-2; a tier-3 segment (64 commits' worth, ~512k entries) waits for compaction
COMPACT_HINT = 32  # past this many segments (~14M rows) `er ingest` and `er cache info` suggest `er cache compact`:
# a key claim asks every segment (9 ms a call of 512 keys at 25 segments, REPORT `scale`)
CACHED_ENTRIES = 1_000_000  # index entries an Index keeps after reading them (about 64 MB), least recently used dropped
CACHED_FILTER_BYTES = 64 << 20  # Bloom filters a reader keeps (an uncompacted 1B cache has 1.25 GB); claims keep all
MAGIC = b"ERI4"
RECORD = np.dtype([("digest", "S16"), ("shard", "<i4"), ("length", "<i4"), ("name", "V12"), ("crc", "<u4"),
                   ("ids_at", "<u4"), ("hidden_at", "<u4"), ("scale_at", "<u4"), ("ids_crc", "<u4"), ("row", "<i4")])
_BUCKET = np.dtype([("start", "<u4"), ("crc", "<u4")])
_TRAILER = struct.Struct("<4sIQQIQI")
BLOOM_BITS, BLOOM_K = 10, 7  # bits an entry and probes a key: about 1% false positives
_UINT = ("crc", "ids_at", "hidden_at", "scale_at", "ids_crc")
SCHEMA = pa.schema([(c, pa.binary(16) if c == "digest" else pa.binary(12) if c == "name" else
                     pa.uint32() if c in _UINT else pa.int32()) for c in RECORD.names])
SHARD_NAME = re.compile(r"part-([0-9a-f]{12})-([0-9a-f]{12})\.parquet")


@dataclass(frozen=True)
class SegmentInfo:
    path: str  # relative to the cache root
    rows: int
    bytes: int
    sha256: str
    shards: int = 0  # shards whose entries it holds


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


def shard_entries(digests: np.ndarray, shard: int, name: str, rows: dict) -> pa.Table:
    """Index entries of one shard (file `name`) whose rows are in `digests` order; `rows` holds the per-row
    columns (length, crc, ids_at, hidden_at, scale_at, ids_crc, row)."""
    n = len(digests)
    cols = {"shard": np.full(n, shard, np.int32), **{c: rows[c] for c in RECORD.names[2:] if c != "name"}}
    return pa.table({"digest": digest_array(digests), "name": _binary([name_bytes(name)] * n, 12),
                     **{c: pa.array(np.asarray(cols[c], RECORD[c]), SCHEMA.field(c).type) for c in cols}},
                    schema=SCHEMA)


def name_bytes(name: str) -> bytes:
    """A shard file's name as the 12 bytes an entry keeps (`part-<12 hex>-<12 hex>.parquet`, the folder left off)."""
    m = SHARD_NAME.fullmatch(name.rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"shard name {name!r} is not part-<12 hex digits>-<12 hex digits>.parquet")
    return bytes.fromhex(m[1] + m[2])


def shard_path(name: bytes) -> str:
    """A shard's file, relative to the cache root, from an entry's 12 name bytes."""
    h = bytes(name).hex()
    return f"shards/part-{h[:12]}-{h[12:]}.parquet"


def _binary(values: list[bytes], width: int) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(b"".join(values))])


def _bits(rows: int) -> int:
    return min(32, max(0, int(np.ceil(np.log2(max(rows, 1) / BUCKET_ENTRIES)))))


def _bucket(digests: np.ndarray, bits: int) -> np.ndarray:
    top = np.frombuffer(np.ascontiguousarray(digests, "S16").tobytes(), ">u8")[::2] if len(digests) else np.empty(0, np.uint64)
    return (top >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(digests), np.int64)


def _crc(start: int, end: int, entries: bytes) -> int:
    return zlib.crc32(entries, zlib.crc32(struct.pack("<II", start, end)))


def segment_bytes(entries: list[pa.Table], shards: list) -> tuple[bytes, int]:
    """One segment file from entry tables and the ShardInfo of every shard they point into: (file bytes, rows)."""
    t = pa.concat_tables(entries) if entries else SCHEMA.empty_table()
    rec = np.empty(t.num_rows, RECORD)
    rec["digest"] = digests_of(t.column("digest"))
    rec["name"] = _fixed(t.column("name"), 12).view("V12")
    for c in RECORD.names:
        if c not in ("digest", "name"):
            rec[c] = t.column(c).to_numpy()
    rec = rec[np.argsort(rec["digest"], kind="stable")]
    bits = _bits(len(rec))
    starts = np.searchsorted(_bucket(rec["digest"], bits), np.arange((1 << bits) + 1)).astype(np.uint32)
    body = rec.tobytes()
    table = np.zeros(len(starts), _BUCKET)
    table["start"] = starts
    for b in range(len(starts) - 1):
        s, e = int(starts[b]), int(starts[b + 1])
        table["crc"][b] = _crc(s, e, body[s * RECORD.itemsize: e * RECORD.itemsize])
    listing = json.dumps([x if isinstance(x, dict) else asdict(x) for x in shards], separators=(",", ":")).encode()
    bloom = bloom_bytes(rec["digest"])
    trailer = _TRAILER.pack(MAGIC, bits, len(rec), len(listing), zlib.crc32(listing), len(bloom), zlib.crc32(bloom))
    return body + table.tobytes() + listing + bloom + trailer, len(rec)


def _probes(digests: np.ndarray, m: int) -> np.ndarray:
    """(n, BLOOM_K) bit positions of digests (double hashing on the digest's two halves: it is a hash already)."""
    v = np.frombuffer(np.ascontiguousarray(digests, "S16").tobytes(), "<u8").reshape(-1, 2)
    h1, h2 = v[:, 0], v[:, 1] | np.uint64(1)
    i = np.arange(BLOOM_K, dtype=np.uint64)
    return (h1[:, None] + i[None, :] * h2[:, None]) % np.uint64(m)


def bloom_size(rows: int) -> int:
    """Bytes of the Bloom filter of `rows` entries."""
    return max(64, -(-BLOOM_BITS * rows // 8) * 8) // 8


def bloom_bytes(digests: np.ndarray) -> bytes:
    m = bloom_size(len(digests)) * 8
    bits = np.zeros(m, bool)
    bits[_probes(digests, m).ravel().astype(np.int64)] = True
    return np.packbits(bits, bitorder="little").tobytes()


def bloom_holds(bloom: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Bool mask: which digests the filter may hold (False: certainly absent)."""
    if not len(digests):
        return np.zeros(0, bool)
    pos = _probes(digests, len(bloom) * 8).astype(np.int64)
    return ((bloom[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).astype(bool).all(axis=1)


def _fixed(col, width: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.empty(0, dtype=f"S{width}")
    return np.frombuffer(arr.buffers()[1], dtype=f"S{width}", count=len(arr), offset=arr.offset * width).copy()


def _coalesce(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1] + COALESCE:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


class SegmentGone(CacheCorruptError):
    """A segment file the reader's version lists is gone: merged away by a later commit, or lost."""


class _Segment:
    """One segment file: its layout (from the manifest alone) and checked ranged reads of its buckets."""

    def __init__(self, fs, root: str, seg: SegmentInfo, where: str):
        self.fs, self.path, self.seg, self.where = fs, f"{root}/{seg.path}", seg, where
        self.bits = _bits(seg.rows)
        self.buckets = 1 << self.bits
        self.table_at = seg.rows * RECORD.itemsize
        self.listing_at = self.table_at + (self.buckets + 1) * _BUCKET.itemsize
        self._trailer, self._bloom = None, None
        if self.listing_at + _TRAILER.size > seg.bytes:
            raise CacheCorruptError(f"{where}: {seg.bytes} bytes does not fit {seg.rows} entries (`er cache repair`)")

    def fetch(self, spans: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        """(start, bytes) of the merged ranges covering `spans`, one request each."""
        merged = _coalesce(spans)
        if not merged:
            return []
        try:
            parts = self.fs.cat_ranges([self.path] * len(merged), [s for s, _ in merged], [e for _, e in merged],
                                       on_error="raise")
        except FileNotFoundError:
            raise SegmentGone(f"{self.where} is listed in the cache's version but missing (`er cache repair`)") from None
        if any(len(d) != e - s for (s, e), d in zip(merged, parts)):
            raise CacheCorruptError(f"{self.where} is truncated (`er cache repair`)")
        return [(s, d) for (s, _), d in zip(merged, parts)]

    def read(self, buckets: np.ndarray) -> dict[int, np.ndarray]:
        """The entries of the given buckets, each checked against its crc. Only the buckets asked for are decoded:
        nearby table entries arrive in the same requests, and looking at all of them made a lookup of 512 keys
        in a big segment spend its time in Python."""
        w, r = _BUCKET.itemsize, RECORD.itemsize
        bounds = {}  # bucket -> (start, end, crc)
        got = self.fetch([(self.table_at + int(b) * w, self.table_at + (int(b) + 2) * w) for b in buckets.tolist()])
        at = [a for a, _ in got]
        for b in buckets.tolist():
            off = self.table_at + b * w
            j = bisect_right(at, off) - 1
            t = np.frombuffer(got[j][1], _BUCKET, 2, off - at[j])
            bounds[b] = (int(t["start"][0]), int(t["start"][1]), int(t["crc"][0]))
        if any(not (0 <= s <= e <= self.seg.rows) for s, e, _ in bounds.values()):
            raise CacheCorruptError(f"{self.where} fails its checksum (bucket table); refusing to read it (`er cache repair`)")
        got = self.fetch([(s * r, e * r) for s, e, _ in bounds.values() if e > s])
        at = [a for a, _ in got]
        out = {}
        for b, (s, e, crc) in bounds.items():
            data = b""
            if s < e:
                j = bisect_right(at, s * r) - 1  # the fetched range holding the bucket
                data = got[j][1][s * r - at[j]: e * r - at[j]]
            if _crc(s, e, data) != crc:
                raise CacheCorruptError(f"{self.where} fails its checksum (bucket {b}); refusing to read it (`er cache repair`)")
            out[b] = np.frombuffer(data, RECORD)
        return out

    def everything(self) -> np.ndarray:
        """Every entry, every bucket checked."""
        data = self.fetch([(0, self.seg.bytes)])[0][1]
        magic, bits, rows = _TRAILER.unpack(data[-_TRAILER.size:])[:3]
        if (magic, bits, rows) != (MAGIC, self.bits, self.seg.rows):
            raise CacheCorruptError(f"{self.where} has a bad trailer; refusing to read it (`er cache repair`)")
        table = np.frombuffer(data[self.table_at: self.table_at + (self.buckets + 1) * _BUCKET.itemsize], _BUCKET)
        starts = table["start"].astype(np.int64)
        if starts[0] != 0 or starts[-1] != rows or np.any(np.diff(starts) < 0):
            raise CacheCorruptError(f"{self.where} fails its checksum (bucket table); refusing to read it (`er cache repair`)")
        for b in range(self.buckets):
            s, e = int(starts[b]), int(starts[b + 1])
            if _crc(s, e, data[s * RECORD.itemsize: e * RECORD.itemsize]) != int(table["crc"][b]):
                raise CacheCorruptError(f"{self.where} fails its checksum (bucket {b}); refusing to read it (`er cache repair`)")
        return np.frombuffer(data[: self.table_at], RECORD)

    def trailer(self) -> tuple[int, int, int, int]:
        """(shard list length, its crc, bloom length, its crc), read once."""
        if self._trailer is None:
            (_, tail), = self.fetch([(self.seg.bytes - _TRAILER.size, self.seg.bytes)])
            magic, bits, rows, n, crc, nb, bcrc = _TRAILER.unpack(tail)
            if ((magic, bits, rows) != (MAGIC, self.bits, self.seg.rows)
                    or self.listing_at + n + nb + _TRAILER.size != self.seg.bytes):
                raise CacheCorruptError(f"{self.where} has a bad trailer; refusing to read it (`er cache repair`)")
            self._trailer = (n, crc, nb, bcrc)
        return self._trailer

    def shards(self) -> list[dict]:
        """The segment's shard list (checked against its crc): two ranged reads, none of the entries."""
        n, crc, _, _ = self.trailer()
        (_, listing), = self.fetch([(self.listing_at, self.listing_at + n)]) if n else [(0, b"")]
        if zlib.crc32(listing) != crc:
            raise CacheCorruptError(f"{self.where} fails its checksum (shard list); refusing to read it (`er cache repair`)")
        return json.loads(listing) if n else []

    @property
    def has_bloom(self) -> bool:
        return self._bloom is not None

    @property
    def bloom_bytes(self) -> int:
        return 0 if self._bloom is None else len(self._bloom)

    def drop_bloom(self) -> None:
        self._bloom = None  # read again if asked

    def maybe(self, digests: np.ndarray) -> np.ndarray:
        """Bool mask: which digests this segment may hold, from its Bloom filter (read once, checked)."""
        if self._bloom is None:
            n, _, nb, crc = self.trailer()
            (_, data), = self.fetch([(self.listing_at + n, self.listing_at + n + nb)])
            if zlib.crc32(data) != crc:
                raise CacheCorruptError(f"{self.where} fails its checksum (bloom); refusing to read it (`er cache repair`)")
            self._bloom = np.frombuffer(data, np.uint8)
        return bloom_holds(self._bloom, digests)


class Index:
    """The segments of one version; opening it reads nothing.

    A later commit may merge segments away and delete them at once (they only index the shards, which stay):
    `reopen`, if given, returns the latest version's segments, and a lookup that finds a segment gone carries
    on with those (the same rows, found through the merged segment)."""

    def __init__(self, fs, root: str, segments: list[SegmentInfo], url: str, reopen=None, bloom: bool | None = None):
        self.fs, self.root, self.segments, self.url, self.reopen = fs, root, list(segments), url, reopen
        self.bloom = bloom  # ask each segment's Bloom filter first: True always (claims), None where it reads less
        self._open: dict[str, _Segment] = {}
        self._buckets: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # (segment, bucket) -> its entries
        self._kept = 0
        self._filters: OrderedDict[str, int] = OrderedDict()  # segments whose filter is held -> its bytes
        self._filter_bytes = 0

    def _segment(self, seg: SegmentInfo) -> _Segment:
        if seg.path not in self._open:
            self._open[seg.path] = _Segment(self.fs, self.root, seg, f"index segment {seg.path} of {self.url}")
        return self._open[seg.path]

    def lookup(self, digests: np.ndarray) -> np.ndarray:
        """The entries (RECORD) of the given digests that the cache holds."""
        try:
            return self._lookup(digests)
        except SegmentGone:
            if self.reopen is None:
                raise
            latest = list(self.reopen())
            if {s.path for s in latest} >= {s.path for s in self.segments}:
                raise  # nothing was merged away: the file is lost
            self.segments, self._open, self._filters, self._filter_bytes = latest, {}, OrderedDict(), 0
            return self._lookup(digests)

    def _lookup(self, digests: np.ndarray) -> np.ndarray:
        wanted = np.unique(np.asarray(digests, "S16"))
        found = []
        for seg in self.segments if len(wanted) else []:
            s = self._segment(seg)
            here = wanted[s.maybe(wanted)] if self._ask_bloom(s, seg.path, wanted) else wanted
            if s.has_bloom:
                self._hold_filter(seg.path, s)
            if not len(here):
                continue
            ids = np.unique(_bucket(here, s.bits))
            need = np.array([b for b in ids.tolist() if (seg.path, b) not in self._buckets], np.int64)
            for b, rec in (s.read(need) if len(need) else {}).items():
                if (seg.path, b) not in self._buckets:
                    self._buckets[(seg.path, b)] = rec
                    self._kept += len(rec)
            rec = np.concatenate([self._buckets[(seg.path, b)] for b in ids.tolist()])
            for b in ids.tolist():
                self._buckets.move_to_end((seg.path, b))
            while self._kept > CACHED_ENTRIES and len(self._buckets) > len(ids):  # never the buckets just used
                self._kept -= len(self._buckets.popitem(last=False)[1])
            found.append(rec[np.isin(rec["digest"], here)])
        return np.concatenate(found) if found else np.empty(0, RECORD)

    def _hold_filter(self, path: str, s: _Segment) -> None:
        """Count the segment's filter as held, most recent last; past the budget a reader drops the oldest (the
        segments after it ask their buckets again, or read their filter anew where that is fewer bytes)."""
        if path not in self._filters:
            self._filters[path] = s.bloom_bytes
            self._filter_bytes += s.bloom_bytes
        self._filters.move_to_end(path)
        if self.bloom is True:
            return  # claims ask every filter on every call: dropping one would read it again each time
        while self._filter_bytes > CACHED_FILTER_BYTES and len(self._filters) > 1:
            old, n = self._filters.popitem(last=False)
            self._filter_bytes -= n
            if old in self._open:
                self._open[old].drop_bloom()

    def _ask_bloom(self, s: _Segment, path: str, wanted: np.ndarray) -> bool:
        """Whether to ask the segment's filter before its buckets: always for claims, never if told not to, else
        when it is already read or is fewer bytes than the buckets to fetch (a big lookup in a small segment)."""
        if self.bloom is not None or s.has_bloom:
            return self.bloom is not False
        budget = bloom_size(s.seg.rows) // (BUCKET_ENTRIES * RECORD.itemsize)  # buckets the filter's bytes buy
        if len(wanted) <= budget:
            return False  # fewer keys than that: fewer buckets too
        ids = np.unique(_bucket(wanted, s.bits))
        return sum((path, b) not in self._buckets for b in ids.tolist()) > budget

    def holds(self, digests: np.ndarray) -> np.ndarray:
        """Bool mask: which of the digests the cache holds."""
        return np.isin(np.asarray(digests, "S16"), self.lookup(digests)["digest"])

    def locate(self, keys: list[str]) -> pa.Table:
        """The entries of the given keys that the cache holds, with a `key` column; absent keys are left out."""
        keys = list(dict.fromkeys(keys))
        dig = key_digests(keys)
        rec = self.lookup(dig)
        order = np.argsort(dig)
        pos = order[np.searchsorted(dig[order], rec["digest"])]  # back to the caller's keys
        return _table(rec).append_column("key", pa.array([keys[i] for i in pos], pa.string()))

    def shards(self) -> list[dict]:
        """Every shard the segments point into (ShardInfo fields), in commit order."""
        out = [s for seg in self.segments for s in self._segment(seg).shards()]
        return sorted(out, key=lambda s: s["id"])

    def entries(self, columns: list[str] | None = None) -> pa.Table:
        """Every entry (for merges, repairs and checks): index bytes only, never hidden states."""
        recs = [self._segment(s).everything() for s in self.segments]
        return _table(np.concatenate(recs) if recs else np.empty(0, RECORD)).select(columns or SCHEMA.names)


def _table(rec: np.ndarray) -> pa.Table:
    def col(c):
        if c in ("digest", "name"):
            w = RECORD[c].itemsize
            return pa.FixedSizeBinaryArray.from_buffers(pa.binary(w), len(rec), [None, pa.py_buffer(np.ascontiguousarray(rec[c]).tobytes())])
        return pa.array(np.ascontiguousarray(rec[c]), SCHEMA.field(c).type)

    return pa.table({c: col(c) for c in RECORD.names}, schema=SCHEMA)


def tier(rows: int) -> int:
    """A segment's size tier: tier t holds TIER**t to TIER**(t+1) commits' worth of entries (TIER_BASE each)."""
    return int(np.log(max(rows, 1) / TIER_BASE) / np.log(TIER)) if rows > TIER_BASE else 0


def compact_advised(segments: int) -> bool:
    """Whether a cache of this many index segments should be compacted (the JSON summaries say so, not the 32)."""
    return segments > COMPACT_HINT


def compact_hint(url: str, segments: int) -> str:
    """What to add after a count of index segments: a pointer to `er cache compact` once they are many."""
    return (f"; lookups and key claims ask each one, `er cache compact --index-only {url}` merges them into one"
            if compact_advised(segments) else "")


def merge_plan(segments: list[SegmentInfo], tiers: int = COMMIT_TIERS) -> list[SegmentInfo]:
    """The segments to merge into one after a commit: the smallest size tier below `tiers` that holds TIER
    segments, or none.

    Size-tiered (as Cassandra's STCS): only segments of about one size merge, so an entry is rewritten once per
    tier it climbs. Without a top tier that is log_TIER(cache / commit) times, and a commit's mean cost grew with
    the cache (1.7x from 100k to 10M rows, 16x to 100M, as replayed in REPORT `scale`). With merges stopping at
    tier COMMIT_TIERS, no merge is bigger than TIER**COMMIT_TIERS commits of TIER_BASE entries (an entry of ingest's
    8k-entry commits is written at most four times; smaller commits merge more often within tier 0), so a
    commit costs the same at 100k rows and at 1B. The price: with ingest's commits, one more segment every 64
    commits (25 measured at 10M rows, about 1,900 at 1B) that lookups and key claims ask, until `er cache compact`
    merges them all, as a major compaction does in HBase. Merging a fixed share of all segments instead rewrote
    one growing segment every few commits (15x in bytes from 100k to 10M)."""
    by_tier: dict[int, list[SegmentInfo]] = {}
    for s in segments:
        by_tier.setdefault(tier(s.rows), []).append(s)
    for t in sorted(by_tier):
        if t < tiers and len(by_tier[t]) >= TIER:
            return by_tier[t]
    return []
