"""er_core.host_memory: ingestion's workers keep freed buffers for the next shard."""

import ctypes
import ctypes.util
import sys

import pytest

from er_core.host_memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="glibc only")
def test_thresholds_applied_once_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # cached: applied once per process
    assert keep_freed_memory.cache_info().hits >= 1
    # a 16 MB buffer freed and taken again reuses the heap (glibc's default would mmap and unmap it each time)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    a = libc.malloc(16 << 20)
    libc.free(a)
    b = libc.malloc(16 << 20)
    libc.free(b)
    assert a == b
