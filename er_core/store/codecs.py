"""How hidden states are stored: one codec per precision, all decoding to float32.

Every codec encodes one example's (tokens, H) float32 array to a flat byte payload
(plus, for int8, a per-token scale payload), on the host from numpy or on the model's device from a
torch tensor, to the same bytes. Stated error bounds, checked by tests:

| codec | bytes/value | scale bytes/token | error bound (per element)           |
|-------|-------------|-------------------|-------------------------------------|
| fp32  | 4           | 0                 | exact                               |
| fp16  | 2           | 0                 | relative 2**-11 (normal range)      |
| bf16  | 2           | 0                 | relative 2**-8                      |
| int8  | 1           | 4                 | absolute max|x_token| / 254          |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ErError


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    # Round to nearest even on the upper 16 bits of the float32 pattern (what torch does).
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _enc_fp32(x):
    return x.astype("<f4", copy=False).tobytes(), None


def _dec_fp32(payload, scale, shape):
    return np.frombuffer(payload, dtype="<f4").reshape(shape)


def _enc_fp16(x):
    y = x.astype("<f2")
    if not np.isfinite(y).all() and np.isfinite(x).all():
        raise ErError("hidden states overflow fp16 (|x| > 65504); use codec 'bf16' or 'fp32' for this model")
    return y.tobytes(), None


def _dec_fp16(payload, scale, shape):
    return np.frombuffer(payload, dtype="<f2").reshape(shape).astype(np.float32)


def _enc_bf16(x):
    return _f32_to_bf16(x).astype("<u2").tobytes(), None


def _dec_bf16(payload, scale, shape):
    return _bf16_to_f32(np.frombuffer(payload, dtype="<u2").reshape(shape))


def _enc_int8(x):
    # Per-token symmetric scale: one outlier token does not cost the others precision.
    amax = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype("<f4")
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q.tobytes(), scale.tobytes()


def _dec_int8(payload, scale, shape):
    q = np.frombuffer(payload, dtype=np.int8).reshape(shape).astype(np.float32)
    return q * np.frombuffer(scale, dtype="<f4").reshape(shape[0], 1)


# Decoding into a slot of a padded float32 batch: each row is cast once, in the copy, with no float32 copy of its own.
def _into_fp32(payload, scale, dst):
    dst[...] = np.frombuffer(payload, dtype="<f4").reshape(dst.shape)


def _into_fp16(payload, scale, dst):
    dst[...] = np.frombuffer(payload, dtype="<f2").reshape(dst.shape)


def _into_bf16(payload, scale, dst):
    bits = dst.view(np.uint32)
    bits[...] = np.frombuffer(payload, dtype="<u2").reshape(dst.shape)
    bits <<= 16


def _into_int8(payload, scale, dst):
    np.multiply(np.frombuffer(payload, dtype=np.int8).reshape(dst.shape), np.frombuffer(scale, dtype="<f4").reshape(-1, 1),
                out=dst)


# The same encodings of a (tokens, H) float32 tensor on its device (a GPU in ingestion), as tensors whose bytes
# are the host payloads' bytes: states leave the device already in the storage precision, in one copy.
def _dev_fp32(x):
    return x, None


def _dev_fp16(x):
    y = x.half()
    # an all-finite input that overflows fp16 is an error (as on the host); a flag byte travels with the payload.
    # From x's extremes (one pass; isfinite over x and y took 4x the cast on CPU): finite x rounds to inf at |x| >= 65520.
    if not x.numel():
        return y, x.new_zeros((), dtype=bool)
    lo, hi = x.aminmax()
    return y, lo.isfinite() & hi.isfinite() & ((hi >= 65520) | (lo <= -65520))


def _dev_bf16(x):
    return x.bfloat16(), None


def _dev_int8(x):
    import torch

    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale


@dataclass(frozen=True)
class Codec:
    name: str
    bytes_per_value: int
    scale_bytes_per_token: int
    encode: Callable[[np.ndarray], tuple[bytes, bytes | None]]
    decode: Callable[[bytes, bytes | None, tuple[int, int]], np.ndarray]
    decode_into: Callable[[bytes, bytes | None, np.ndarray], None]  # into a (tokens, hidden) float32 slot
    encode_device: Callable  # torch (tokens, H) float32 -> (payload tensor, int8 scale / fp16 overflow flag / None)

    def bytes_per_token(self, hidden_size: int) -> int:
        """Payload bytes one token costs (hidden states only; token ids add 4)."""
        return self.bytes_per_value * hidden_size + self.scale_bytes_per_token


CODECS: dict[str, Codec] = {
    "fp32": Codec("fp32", 4, 0, _enc_fp32, _dec_fp32, _into_fp32, _dev_fp32),
    "fp16": Codec("fp16", 2, 0, _enc_fp16, _dec_fp16, _into_fp16, _dev_fp16),
    "bf16": Codec("bf16", 2, 0, _enc_bf16, _dec_bf16, _into_bf16, _dev_bf16),
    "int8": Codec("int8", 1, 4, _enc_int8, _dec_int8, _into_int8, _dev_int8),
}
DEFAULT_CODEC = "fp16"


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ErError(f"Unknown codec {name!r}; choose one of {sorted(CODECS)}.") from None
