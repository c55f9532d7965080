"""Parquet files written once and read in parts, each part checked: the IO under the cache's shards and index.

Files are written with a CRC in every page header (`write_page_checksum`), and the manifest keeps the
sha256 of each file's footer (the Parquet metadata plus its 8-byte tail). A reader fetches the footer
(one ranged read), checks it against the manifest, then fetches exactly the column chunks of the row
groups it needs (one ranged read each) and lets pyarrow verify the CRC of every page it decodes. So a
reader checks exactly what it reads, and never reads what it does not need.
"""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CacheCorruptError

_TAIL = 8  # footer length (4 bytes, little endian) + b"PAR1"
FOOTER_SAMPLE = 64 * 1024  # one read usually holds the whole footer


def to_parquet(table: pa.Table, row_group_size: int, compression, statistics: list[str] | bool = False) -> tuple[bytes, str]:
    """The file's bytes and its footer digest. `statistics`: columns whose min/max readers prune row groups by."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression=compression, use_dictionary=False,
                   write_page_checksum=True, write_statistics=statistics)
    data = buf.getvalue()
    return data, footer_digest(data)


def footer_digest(data: bytes) -> str:
    n = int.from_bytes(data[-_TAIL:-4], "little")
    return hashlib.sha256(data[-_TAIL - n:]).hexdigest()


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
            parts = self.fs.cat_ranges([self.path] * len(spans), [s for s, _ in spans], [e for _, e in spans])
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
