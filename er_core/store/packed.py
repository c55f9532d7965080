"""A shard's cache rows in contiguous buffers: what flows between ingestion's stages (tokenize -> embed -> write).

Row i's tokens are `offsets[i]:offsets[i+1]` of `ids`, and of the states `payload` in units of the codec's
bytes per token, so no stage handles a Python object per row: the embed stage pads a batch with one
indexing operation, and the write stage wraps the buffers in Arrow arrays (cache.packed_table). Between
Ray Data stages a PackedRows travels as one Arrow row of large binaries, without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

_BLOBS = {"lengths": np.int32, "ids": np.int32, "types": np.int8, "truncated": np.bool_, "payload": np.uint8, "scale": np.uint8}


@dataclass
class PackedRows:
    keys: list[str]
    lengths: np.ndarray  # int32, tokens per row
    ids: np.ndarray  # int32, every row's token ids, row after row
    truncated: np.ndarray  # bool per row
    types: np.ndarray | None = None  # int8 segment ids aligned with ids; None when no row has any
    payload: np.ndarray | None = None  # uint8: the codec's bytes of every token, rows in order (after embedding)
    scale: np.ndarray | None = None  # uint8: int8's fp32 scale per token

    @classmethod
    def of(cls, rows) -> "PackedRows":
        """From (key, Tokenized) pairs."""
        lengths = np.array([len(t.input_ids) for _, t in rows], np.int32)
        ids = np.concatenate([t.input_ids for _, t in rows]).astype(np.int32, copy=False) if rows else np.zeros(0, np.int32)
        types = None
        if any(t.type_ids is not None for _, t in rows):
            types = np.concatenate([np.zeros(len(t.input_ids), np.int8) if t.type_ids is None else t.type_ids for _, t in rows])
        return cls([k for k, _ in rows], lengths, ids, np.array([t.truncated for _, t in rows], np.bool_), types)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def take(self, order: np.ndarray) -> "PackedRows":
        """The rows in `order` (before embedding: states are not reordered)."""
        assert self.payload is None, "reorder before embedding"
        off = self.offsets
        idx = ranges(off[:-1][order], self.lengths[order])
        return replace(self, keys=[self.keys[i] for i in order], lengths=self.lengths[order], ids=self.ids[idx],
                       truncated=self.truncated[order], types=None if self.types is None else self.types[idx])

    def padded(self, start: int, stop: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows start..stop as one padded batch: ids (B, T) int64, mask (B, T) bool, types (B, T) int64 or None."""
        off = self.offsets
        lens = self.lengths[start:stop]
        mask = np.arange(int(lens.max()))[None, :] < lens[:, None]
        ids = np.full(mask.shape, pad_id, np.int64)
        ids[mask] = self.ids[off[start]: off[stop]]  # a boolean mask fills row after row: the flat layout
        types = None
        if self.types is not None:
            types = np.zeros(mask.shape, np.int64)
            types[mask] = self.types[off[start]: off[stop]]
        return ids, mask, types

    def to_arrow(self, **extra) -> pa.Table:
        """One Arrow row (the buffers wrapped, not copied) plus scalar columns `extra`."""
        cols = {"keys": pa.array([self.keys], pa.list_(pa.string()))}
        for name in _BLOBS:
            v = getattr(self, name)
            cols[name] = pa.array([None], pa.large_binary()) if v is None else _blob(v)
        cols.update({k: pa.array([v]) for k, v in extra.items()})
        return pa.table(cols)

    @classmethod
    def from_arrow(cls, table: pa.Table, i: int = 0) -> "PackedRows":
        values = {}
        for name, dtype in _BLOBS.items():
            s = table.column(name)[i]
            values[name] = None if not s.is_valid else np.frombuffer(s.as_buffer(), dtype)
        return cls(table.column("keys")[i].as_py(), **values)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the ranges [starts[i], starts[i] + lengths[i]), one after another, with no loop per range."""
    ends = np.cumsum(lengths, dtype=np.int64)
    return np.repeat(np.asarray(starts, np.int64) - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def _blob(arr: np.ndarray) -> pa.Array:
    data = pa.py_buffer(np.ascontiguousarray(arr))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(np.array([0, data.size], np.int64)), data])
