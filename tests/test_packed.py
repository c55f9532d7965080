"""The packed rows between ingestion's stages: the device codecs write the host codecs' bytes, and a shard built
from contiguous buffers equals one built row by row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from er_core.store.writer import SCHEMA, encode_table, packed_table
from er_core.store.codecs import CODECS, get_codec
from er_core.embed import Embedder, Tokenized
from er_core.store.packed import PackedRows, ranges

RNG = np.random.default_rng(0)
LENS = [3, 1, 8, 5, 2, 7, 4]
KEYS = [f"k{i}" for i in range(len(LENS))]
IDS = [RNG.integers(5, 100, n).astype(np.int32) for n in LENS]
STATES = [RNG.standard_normal((n, 6)).astype(np.float32) * 3 for n in LENS]
STATES[2][0] = 0.0  # an all-zero token: int8's scale falls back to 1
TRUNC = [i % 3 == 0 for i in range(len(LENS))]


def _row_by_row(codec: str) -> pa.Table:
    c = get_codec(codec)
    payloads, scales = zip(*(c.encode(h) for h in STATES))
    return pa.table({"key": KEYS, "length": pa.array(LENS, pa.int32()), "input_ids": pa.array(IDS, pa.list_(pa.int32())),
                     "hidden": pa.array(list(payloads), pa.binary()), "scale": pa.array(list(scales), pa.binary()),
                     "truncated": TRUNC}, schema=SCHEMA)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_device_encoding_and_packed_tables_equal_the_row_by_row_shard(codec):
    assert encode_table(KEYS, IDS, STATES, TRUNC, codec).equals(_row_by_row(codec))
    rows = PackedRows.of([(k, Tokenized(x, t)) for k, x, t in zip(KEYS, IDS, TRUNC)])
    y, extra = get_codec(codec).encode_device(torch.from_numpy(np.concatenate(STATES)))
    rows.payload = y.contiguous().view(torch.uint8).reshape(-1).numpy()
    rows.scale = extra.contiguous().view(torch.uint8).reshape(-1).numpy() if codec == "int8" else None
    assert packed_table(rows, codec).equals(_row_by_row(codec))
    travelled = PackedRows.from_arrow(pa.concat_tables([rows.to_arrow(seen=1), rows.to_arrow(seen=2)]), 1)
    assert packed_table(travelled, codec).equals(_row_by_row(codec))  # through Arrow, as between Ray Data stages


def test_fp16_overflow_on_the_device_is_refused_as_on_the_host():
    from er_core import ErError

    lower = torch.nn.Module()
    lower.forward = lambda ids, mask, types: torch.full((*ids.shape, 4), 1e6)
    emb = Embedder(lower, 0)
    rows = PackedRows.of([("a", Tokenized(np.array([1, 2], np.int32), False))])
    with pytest.raises(ErError, match="overflow fp16"):
        emb.pack(rows, "fp16")
    assert len(emb.pack(rows, "bf16").payload) == 2 * 4 * 2


def test_packing_reorders_rows_with_their_tokens_and_pads_in_one_step():
    types = [None, np.array([0], np.int8), np.arange(8, dtype=np.int8) % 2, None, None, None, None]
    rows = PackedRows.of([(k, Tokenized(x, t, ty)) for k, x, t, ty in zip(KEYS, IDS, TRUNC, types)])
    order = np.array([2, 0, 6, 1])
    sub = rows.take(order)
    assert sub.keys == [KEYS[i] for i in order] and sub.truncated.tolist() == [TRUNC[i] for i in order]
    assert np.array_equal(sub.ids, np.concatenate([IDS[i] for i in order]))
    ids, mask, tt = sub.padded(1, 4, pad_id=0)  # rows 0, 6, 1 of the original
    assert ids.shape == (3, 4) and mask.sum(1).tolist() == [3, 4, 1]
    assert ids[0, :3].tolist() == IDS[0].tolist() and ids[0, 3] == 0 and ids[1].tolist() == IDS[6].tolist()
    assert tt is not None and not tt.any()  # these rows have no segment ids
    assert sub.padded(0, 1, 0)[2][0].tolist() == (np.arange(8) % 2).tolist()
    assert ranges(np.array([5, 0, 2]), np.array([2, 0, 3])).tolist() == [5, 6, 2, 3, 4]

