"""`release_freed_blocks` pins glibc's mmap threshold: large blocks get mappings of their own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lorakit.utils import memory, release_freed_blocks

CHILD = textwrap.dedent(
    """
    import ctypes, sys, torch
    from lorakit.utils import release_freed_blocks

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        ).split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    block = torch.empty(8 << 20, dtype=torch.uint8)
    del block  # freeing an 8 MiB mapping raises glibc's dynamic threshold past 2 MiB
    if sys.argv[1] == "pinned":
        assert release_freed_blocks()
    before = libc.mallinfo2().hblkhd
    kept = torch.empty(2 << 20, dtype=torch.uint8)
    print(libc.mallinfo2().hblkhd - before)
    """
)


def _mapped_bytes_of_a_2mib_block(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


@pytest.mark.skipif(memory._glibc() is None, reason="glibc only")
def test_pinned_threshold_maps_large_blocks_of_their_own() -> None:
    assert _mapped_bytes_of_a_2mib_block("default") == 0  # taken from the heap, kept there
    assert _mapped_bytes_of_a_2mib_block("pinned") >= 2 << 20  # own mapping, unmapped on free


def test_threshold_out_of_range_names_the_range() -> None:
    with pytest.raises(ValueError, match="0 to 33554432"):
        release_freed_blocks(64 << 20)
