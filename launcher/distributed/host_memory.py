"""How the training process's host (CPU) memory allocator treats freed blocks.

Each optimizer step frees the gradients (`zero_grad(set_to_none=True)`) and backward allocates them again;
on CPU that is every parameter's worth of memory per step. glibc serves blocks above its mmap threshold
(128 KiB, growing to at most 32 MiB) with fresh `mmap`s and returns them with `munmap`, so every step
page-faults the whole gradient set back in. Raising the mmap and trim thresholds keeps freed blocks in the
heap for the next step: MiniLM steps went from about 175 to 155 ms in a profile on 2 Xeon cores, and the
benchmark harness measured 5% and 10% more samples/s (medians of 3) on 2 EPYC cores (docs/benchmarks.md). The
cost is that the process keeps its peak resident size, which a training process reaches every step anyway.
This is what `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment do, applied from inside
the process so that `python launcher/run.py` gets it without a wrapper.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there once freed: above any single gradient or
# activation of a model trained on CPU, below the point where one allocation should be given back.
KEEP_BLOCKS_UP_TO = 1 << 30
# Never shrink the heap from its top (the largest value mallopt's int takes).
NEVER_TRIM = 2**31 - 1


def keep_freed_host_memory() -> str:
    """Make glibc keep freed blocks for reuse; returns what was done, for the run plan."""
    if platform.libc_ver()[0] != "glibc":
        return "host memory: left to the system allocator (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    applied = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if not applied:
        return "host memory: glibc refused the mallopt thresholds; system allocator defaults kept"
    return f"host memory: freed blocks up to {KEEP_BLOCKS_UP_TO >> 20} MiB are kept for reuse (glibc mallopt)"
