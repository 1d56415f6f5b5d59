"""Keep freed CPU memory for reuse instead of handing it back to the OS after every step.

glibc's malloc serves large blocks (gradients, activations) with ``mmap`` and returns them with
``munmap`` when freed, so a training loop that frees its gradients after every optimizer step
page-faults all of them in again on the next backward. PipeDream's ``1f1b`` steps after *every*
microbatch, and measured on this project's machines (``benchmarks/bench_runtime.py``; a 6-layer
512-wide MLP stage at one thread) that costs up to twice the microbatch's compute. Raising the
mmap threshold makes such blocks come from the heap, and raising the trim threshold keeps them
there once freed: no page faults, and stepping every microbatch becomes as cheap as accumulating.

The mmap threshold stops at 32 MiB (glibc's own ceiling for its adaptive threshold): blocks
above it — a big model's vocabulary matrices and their gradients, Adam's moments for them —
still get their own mappings and go back to the OS when freed. Kept in the heap, such blocks
fragment it: the next step's allocations do not fit the holes they leave and the heap grows
instead (one process training an end stage of ``benchmarks/bench_memory.py``'s GPT — its 206 MB
embedding and six blocks, fused Adam, 4 microbatches — peaked at 2.73 GB with a 1 GB threshold
and 2.59 GB with the cap; the runtime README has the whole benchmark).

It is process-wide, so the train command applies it at start-up (``--no-malloc-tuning`` opts
out) and the benchmark applies it to every contender alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_TRIM_THRESHOLD = 1 << 30
# torch's CPU allocator madvises tensors of 2 MB and more as huge pages when this is set at start-up
HUGE_PAGES_ENV = ("THP_MEM_ALLOC_ENABLE", "1")


def _libc(name: str) -> Any:
    """glibc's function ``name``, or None where there is none (not Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Tune glibc malloc as described above; ``False`` where that is not possible (not glibc)."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS now (``malloc_trim``), e.g. after giving layers away.

    The tuning above keeps freed memory for reuse; a rank that has just given away layers will
    not reuse it, and its peak should fall to what it now holds.
    """
    trim = _libc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return 0


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``; 0 where unknown)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return 0
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")
