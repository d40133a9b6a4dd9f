"""Keeping the freed memory of a training step from staying resident (glibc's allocator).

glibc raises its mmap threshold each time a large block is freed, so after the first step the
activation-sized blocks of later steps come from the heap, and holes between the few blocks
that live on (checkpointed hidden states, optimizer state) cannot go back to the system. On
the QLoRA benchmark that left ~300 MiB of freed heap resident: as much as the 4-bit model and
its live activations together. Pinning the threshold keeps blocks of at least that size in
mappings of their own, returned to the system as soon as they are freed, at the cost of a
page fault per page on each new block (~25% step time on that benchmark).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
DEFAULT_THRESHOLD_BYTES = 1 << 20


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    library = ctypes.CDLL(name)
    return (
        library
        if hasattr(library, "mallopt") and hasattr(library, "gnu_get_libc_version")
        else None
    )


def release_freed_blocks(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Make every later allocation of `threshold_bytes` or more go back to the OS when freed.

    A process-wide setting of glibc's allocator (the same as starting Python with
    ``MALLOC_MMAP_THRESHOLD_=<bytes>``); call it once before training when memory, not step
    time, is what limits the run, as with QLoRA. Returns False, changing nothing, where the C
    library is not glibc (macOS, Windows, musl).

    Raises:
        ValueError: for a threshold outside glibc's range (0 to 32 MiB).
    """
    if not 0 <= threshold_bytes <= 32 << 20:
        raise ValueError(
            f"threshold_bytes={threshold_bytes} is outside glibc's range; use 0 to {32 << 20} "
            f"(the default {DEFAULT_THRESHOLD_BYTES} suits training activations)."
        )
    library = _glibc()
    if library is None:
        return False
    return bool(library.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)))
