"""Host memory for processes that move a shard's states at a time: freed buffers kept for the next shard.

glibc hands every freed buffer over its mmap threshold (at most 32 MB, often far less) back to the OS, so
each shard's states, padded batches and Parquet bytes land on fresh pages that the kernel must fault in
and zero: about 100 page faults a text at BERT-base width, a third of ingestion's CPU side (REPORT
`ingest-cpu-side`). Raising the mmap and trim thresholds lets a worker reuse its own pages; its memory
stays at its peak (a few shards' worth) instead.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit: smaller buffers come from (and go back to) the heap
TRIM_THRESHOLD = 256 << 20  # free heap kept before any is given back: a few shards' buffers, no more


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the thresholds to this process, once; False where the C library is not glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # no libc by that name, or one without mallopt (musl)
        return False
