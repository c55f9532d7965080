"""Parquet files written once and read in parts, each part checked: the IO under the cache's shards and index.

Files are written with a CRC in every page header (`write_page_checksum`), and the manifest keeps the
sha256 of each file's footer (the Parquet metadata plus its 8-byte tail). A reader fetches the footer
(one ranged read), checks it against the manifest, then fetches exactly the column chunks of the row
groups it needs (one ranged read each) and lets pyarrow verify the CRC of every page it decodes. So a
reader checks exactly what it reads, and never reads what it does not need.

Row-level reads: each column chunk is written as one uncompressed plain page (`ONE_PAGE`), whose values
come last, so a row's values sit at a byte offset that follows from the chunk's end and the sizes of the
rows after it (`row_offsets`). Those offsets go into the key index with a crc32 of the bytes, and a task
fetches its rows' own bytes (`fetch_spans`, neighbours merged into one request), wherever they lie.
"""

from __future__ import annotations

import hashlib
import io
import zlib

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CacheCorruptError

_TAIL = 8  # footer length (4 bytes, little endian) + b"PAR1"
FOOTER_SAMPLE = 64 * 1024  # one read usually holds the whole footer
ONE_PAGE = 1 << 30  # page size limit: every column chunk is one page (a row group's states are far smaller)
COALESCE = 4096  # row ranges closer than this are fetched in one request


def to_parquet(table: pa.Table, row_group_size: int, compression, statistics: list[str] | bool = False) -> tuple[bytes, str]:
    """The file's bytes and its footer digest. `statistics`: columns whose min/max readers prune row groups by."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression=compression, use_dictionary=False,
                   write_page_checksum=True, write_statistics=statistics, data_page_size=ONE_PAGE,
                   max_rows_per_page=row_group_size)
    data = buf.getvalue()
    return data, footer_digest(data)


def footer_digest(data: bytes) -> str:
    n = int.from_bytes(data[-_TAIL:-4], "little")
    return hashlib.sha256(data[-_TAIL - n:]).hexdigest()


def _values(col) -> tuple[np.ndarray, memoryview]:
    """(offsets, data) of a binary or list<int32> column: row i's plain bytes are data[off[i]:off[i+1]] (a view of
    the column's buffer: copying a shard's states once more cost a GPU node's CPU side 8 ms a shard)."""
    if hasattr(col, "combine_chunks"):  # one chunk (a written shard's): no copy
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    if pa.types.is_list(arr.type):
        off = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4).astype(np.int64) * 4
        vals = arr.values
        return off, memoryview(vals.buffers()[1]).cast("B")[vals.offset * 4:]
    if arr.null_count == len(arr):
        return np.zeros(len(arr) + 1, np.int64), memoryview(b"")
    off = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4).astype(np.int64)
    return off, memoryview(arr.buffers()[2]).cast("B")


def row_offsets(data: bytes, table: pa.Table, columns: list[str], prefix: dict[str, int]) -> dict[str, np.ndarray]:
    """For each of `columns` (plain, uncompressed, one page per chunk), the byte offset in `data` of every row's
    values, in table order. `prefix`: bytes before each value (4 for a binary value's length, 0 for list items).

    In a one-page chunk the values come last, so row r of a row group starts at the chunk's end minus the
    sizes of rows r.. of that group. Every offset is checked against the row's bytes; a writer whose layout
    differs (another Parquet version) falls back to searching the file, which the same check then proves.
    """
    data = bytes(data)  # no copy for bytes
    md = pq.read_metadata(pa.BufferReader(data))
    names = md.schema.to_arrow_schema().names
    out = {}
    for name in columns:
        off, vals = _values(table.column(name))
        sizes = np.diff(off) + prefix[name]
        at = np.zeros(table.num_rows, np.int64)
        first = 0
        for g in range(md.num_row_groups):
            chunk = md.row_group(g).column(names.index(name))
            end = chunk.data_page_offset + chunk.total_compressed_size
            n = md.row_group(g).num_rows
            at[first:first + n] = end - np.cumsum(sizes[first:first + n][::-1])[::-1] + prefix[name]
            first += n
        cursor = 0
        for i in range(table.num_rows):
            a, b = int(off[i]), int(off[i + 1])
            # bytes == bytes is one memcmp; a memoryview comparison goes element by element (40 us a row of states)
            if b > a and data[at[i]: at[i] + b - a] != vals[a:b].tobytes():
                at[i] = data.find(vals[a:b], cursor)
                if at[i] < 0:
                    raise ValueError(f"row {i} of column {name!r} not found in the written file")
            cursor = max(cursor, int(at[i]) + b - a)
        out[name] = at
    return out


def crc32s(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Per row, the crc32 of its values of `columns`, concatenated in that order (what a row read fetches)."""
    cols = [_values(table.column(c)) for c in columns]
    out = np.zeros(table.num_rows, np.uint32)
    for i in range(table.num_rows):
        crc = 0
        for off, vals in cols:
            crc = zlib.crc32(vals[off[i]:off[i + 1]], crc)
        out[i] = crc
    return out


def fetch_spans(fs, path: str, spans: list[tuple[int, int]], where: str) -> list[bytes]:
    """The bytes of each (start, end) span of one file, nearby spans merged into one ranged request."""
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    merged: list[list[int]] = []
    for i in order:
        s, e = spans[i]
        if merged and s <= merged[-1][1] + COALESCE:
            merged[-1][1] = max(e, merged[-1][1])
        else:
            merged.append([s, e])
    try:
        parts = fs.cat_ranges([path] * len(merged), [s for s, _ in merged], [e for _, e in merged], on_error="raise")
    except FileNotFoundError:
        raise CacheCorruptError(f"{where} is listed in the cache but missing") from None
    out: list[bytes] = [b""] * len(spans)
    j = 0
    for i in order:
        s, e = spans[i]
        while not (merged[j][0] <= s and e <= merged[j][1]):
            j += 1
        if len(parts[j]) != merged[j][1] - merged[j][0]:
            raise CacheCorruptError(f"{where} is truncated; refusing to read it (`er cache repair`)")
        out[i] = parts[j][s - merged[j][0]: e - merged[j][0]]
    return out


class PartialFile:
    """A Parquet file of known size with a checked footer; reads row groups by fetching only their bytes."""

    def __init__(self, fs, path: str, size: int, footer_sha256: str, where: str):
        self.fs, self.path, self.size, self.where = fs, path, size, where
        start = max(0, size - FOOTER_SAMPLE)
        try:
            tail = fs.cat_file(path, start=start, end=size)
        except FileNotFoundError:
            raise CacheCorruptError(f"{where} is listed in the manifest but missing") from None
        n = int.from_bytes(tail[-_TAIL:-4], "little") if len(tail) >= _TAIL else -1
        if len(tail) != size - start or tail[-4:] != b"PAR1" or not 0 < n <= size - 2 * _TAIL:
            raise CacheCorruptError(f"{where} is truncated or not a Parquet file; repair the cache (`er cache repair`)")
        if size - _TAIL - n < start:  # a footer bigger than the sample: one more read
            tail = fs.cat_file(path, start=size - _TAIL - n, end=start) + tail
        footer = tail[-_TAIL - n:]
        if hashlib.sha256(footer).hexdigest() != footer_sha256:
            raise CacheCorruptError(f"{where} fails its checksum (footer); refusing to read it (`er cache repair`)")
        self.metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + footer))
        self.footer_bytes = len(footer)

    def ranges(self, row_groups, columns) -> list[tuple[int, int]]:
        """(start, end) of the column chunks `columns` of `row_groups`, adjacent ones merged."""
        md, names = self.metadata, self.metadata.schema.to_arrow_schema().names
        want = [names.index(c) for c in columns]
        spans = []
        for g in row_groups:
            rg = md.row_group(g)
            for c in want:
                col = rg.column(c)
                start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                spans.append((start, start + col.total_compressed_size))
        spans.sort()
        merged = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
            else:
                merged.append((s, e))
        return merged

    def read(self, row_groups, columns) -> pa.Table:
        """The rows of `row_groups` (in that order), `columns` only; every page read is CRC-checked."""
        row_groups = list(row_groups)
        if not row_groups:
            return self.metadata.schema.to_arrow_schema().empty_table().select(columns)
        spans = self.ranges(row_groups, columns)
        try:  # the same ranged reads on local disk and object storage: what is read is what is counted
            parts = self.fs.cat_ranges([self.path] * len(spans), [s for s, _ in spans], [e for _, e in spans],
                                       on_error="raise")
        except FileNotFoundError:
            raise CacheCorruptError(f"{self.where} is listed in the manifest but missing") from None
        try:
            pf = pq.ParquetFile(_Ranges(self.size, dict(zip(spans, parts))), metadata=self.metadata, page_checksum_verification=True, pre_buffer=False)
            return pf.read_row_groups(row_groups, columns=columns, use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise CacheCorruptError(f"{self.where} is corrupt ({e}); refusing to use it (`er cache repair`)") from None

    def bytes_for(self, row_groups, columns) -> int:
        return sum(e - s for s, e in self.ranges(row_groups, columns))


class _Ranges(io.RawIOBase):
    """A read-only file of `size` bytes that holds only the byte ranges fetched for one read."""

    def __init__(self, size: int, parts: dict[tuple[int, int], bytes]):
        self._size, self._parts, self._pos = size, parts, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        for (s, e), data in self._parts.items():
            if s <= self._pos and end <= e:
                out = data[self._pos - s: end - s]
                self._pos = end
                return out
        raise OSError(f"read of bytes {self._pos}..{end} outside the fetched ranges")
