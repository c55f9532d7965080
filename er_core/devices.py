"""Where tensors go: the model's device, batches moved to it, and optional bf16 autocast for training.

On a Ray Train worker the device is `ray.train.torch.get_device()` (its GPU, or the CPU); er_core
takes it from the model's parameters, so the same loop runs unchanged in one process or on Ray.
"""

from __future__ import annotations

import contextlib
import queue
import threading

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


def prefetched(batches, device: torch.device, depth: int = 2, threaded: bool | None = None):
    """The batches, each already on `device`. On a GPU (or `threaded`) the next `depth` are built (decoded, collated,
    pinned) and copied in a background thread while the current one trains; on CPU they come as they are made,
    since a thread would only take a core from the step. The copies share the compute stream, so a step never
    reads a batch before it arrives."""
    if not (device.type == "cuda" if threaded is None else threaded):
        yield from (to_device(b, device) for b in batches)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for b in batches:
                if not put(to_device(b, device)):
                    return
            put(end)
        except BaseException as e:  # raised in the training thread, where it belongs
            put(e)

    t = threading.Thread(target=work, daemon=True, name="er-prefetch")
    t.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)
