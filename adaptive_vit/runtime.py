"""Process-wide settings that make CPU runs fast: here, how freed tensor memory is kept.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MB by default) with
fresh pages and returns them to the OS on free, so each such tensor pays one page fault per
4 KB the first time it is written. Vision transformers at batch 64 allocate many of them (a
(64, 6, 197, 197) attention term is 60 MB; a DeiT-S MLP hidden, 77 MB). After
`keep_freed_memory` those faults stop after the first batch; the faults and forward times it
saved, with the commit they were measured at, are in docs/performance.md (CPU runtime). It is
the remedy of PyTorch's CPU tuning guide (jemalloc or tcmalloc,
configured to keep freed pages), done with the C library already loaded instead of a
preloaded one. Its cost: the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

OPT_OUT = "ADAPTIVE_VIT_SYSTEM_MALLOC"  # set (to anything) to leave malloc as it is

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # serve every allocation below 1 GiB from the reusable heap
TRIM_THRESHOLD = (1 << 31) - 1  # never give freed heap memory back (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    Applies to allocations made after the call, process-wide (DataLoader workers forked later
    inherit it). Does nothing when `ADAPTIVE_VIT_SYSTEM_MALLOC` is set or the C library is not
    glibc (musl, macOS, Windows; or jemalloc/tcmalloc preloaded, which glibc's settings do not
    reach).

    Returns:
        Whether glibc accepted both settings.
    """
    if os.environ.get(OPT_OUT) or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # A glibc that caps the mmap threshold at 32 MB refuses 1 GiB (returns 0): nothing changes then.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
