"""Keep freed host memory in the process, so the update's big temporaries are not faulted in again.

Why: on CPU every micro-batch of the update allocates and frees buffers of tens to hundreds of
megabytes (a vocabulary-sized weight gradient, a chunk of logits, a bf16 gradient cast to fp32).
glibc serves any allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and
returns it to the kernel on `free`, so the next micro-batch pays the page faults and the kernel's
zero-fill of every page again: allocating and filling SmolLM2's [49152, 576] fp32 weight
gradient took 2.3-2.4x longer the default way than with freed pages kept (139 vs 60 ms and 59 vs
25 ms in two runs on a loaded 2-core machine, one thread; `python -m rlino.allocator` measures it). A profile of a bf16 SmolLM2 update
attributed about a quarter of its time to such faults (issue 16).

`keep_freed_memory()` tells glibc (through `mallopt`) to serve large blocks from its heap instead
of `mmap` and never to trim the heap, so freed blocks are reused by the next micro-batch. The
price: memory freed is not returned to the operating system until the process ends, so the
process's resident size stays at its high-water mark (the peak is unchanged; fragmentation can
add to it). `TrainConfig.keep_freed_memory` (default on) applies it when a run is built; it is a
no-op where the C library is not glibc (macOS, musl) and on memory the GPU allocator owns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""glibc's mallopt parameters (malloc.h): the heap top kept on free, and the most mmap'd blocks."""
NEVER_TRIM = 2**31 - 1
"""The largest trim threshold mallopt takes (an int): the heap is, in practice, never trimmed."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (the one with `mallopt` and `gnu_get_libc_version`)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (once per process); True if it now does."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def _measure(repeats: int = 5) -> None:
    """Print the time to allocate and fill a [49152, 576] fp32 buffer, the default way and kept."""
    import time

    import torch

    torch.set_num_threads(1)

    def once() -> None:
        buffer = torch.zeros(49152, 576)
        buffer += 1.0

    def timed() -> float:
        once()
        start = time.perf_counter()
        for _ in range(repeats):
            once()
        return (time.perf_counter() - start) / repeats * 1e3

    before = timed()
    kept = keep_freed_memory()
    after = timed()
    print(f"default: {before:.1f} ms  kept ({'applied' if kept else 'not glibc'}): {after:.1f} ms")


if __name__ == "__main__":
    _measure()
