"""Where tensors go: the model's device, batches moved to it, and optional bf16 autocast for training.

On a Ray Train worker the device is `ray.train.torch.get_device()` (its GPU, or the CPU); er_core
takes it from the model's parameters, so the same loop runs unchanged in one process or on Ray.
"""

from __future__ import annotations

import contextlib

import torch


def model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (asynchronous copies from pinned memory on a GPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(precision: str, device: torch.device):
    """bf16 autocast for `precision="bf16"` (weights and optimizer stay fp32); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
