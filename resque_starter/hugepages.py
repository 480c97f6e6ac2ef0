"""The mold's heap on transparent huge pages, so that every fork and every exit of a worker or
work-horse is cheaper.

fork() copies one page-table entry per mapped 4 KiB page and exit() drops each one again: with a
100 MB app that is tens of thousands of entries, and milliseconds, twice per forked job. Once the
mold has built the app and frozen it, `collapse_heap` asks the kernel (MADV_COLLAPSE, Linux 6.1) to
back the app's anonymous memory with 2 MiB pages where it can, so a fork copies one entry per 2 MiB
instead. A process that later writes to such a page copies 4 KiB of it as before (the kernel splits
the mapping in that process only), so sharing is unchanged. Only 2 MiB ranges the heap already
(nearly) fills are collapsed, so the memory cost is small (MAX_MISSING pages per huge page at most).
Nothing happens where THP is disabled (`transparent_hugepage/enabled` = never), or on kernels
without MADV_COLLAPSE.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

log = logging.getLogger("resque_starter.hugepages")

MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)  # Python 3.11's mmap module does not name it
HUGE = 2 * 2**20
PAGE = mmap.PAGESIZE
M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound for it on 64-bit systems
MAX_MISSING = 16  # of the 512 pages of a huge page, that a collapse would fill in: 64 KiB at most
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_libc = ctypes.CDLL(None, use_errno=True)


def gather_heap() -> None:
    """Before the app is imported: have malloc serve blocks of up to 32 MiB from its own heap rather
    than from mmap. Otherwise the app's large temporary blocks (a growing list's array, a file read)
    come and go as mappings of their own, and pymalloc's 1 MiB arenas, mapped one at a time, fill the
    holes they leave: short runs of arenas, most without a whole aligned 2 MiB range to collapse (with
    bench_app, 76 of its ~110 MiB could be collapsed; with this, 104). The limit is where glibc's own
    threshold rises to anyway once a program frees a large block; freed heap pages go back to the
    kernel with the mold's malloc_trim."""
    _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)


def collapse_heap() -> int:
    """Collapse this process's writable anonymous memory into huge pages; the bytes collapsed."""
    if not thp_allowed():
        return 0
    done = 0
    for start, end in anonymous_ranges():
        for huge in range(start, end, HUGE):
            if _missing_pages(huge) <= MAX_MISSING and _madvise(huge, HUGE, MADV_COLLAPSE):
                done += HUGE
            # madvise fails with EINVAL without MADV_COLLAPSE, EAGAIN/ENOMEM when no huge page is free:
            # the memory stays as it was, which is only slower
    log.debug("collapsed %d MiB of the heap into huge pages", done >> 20)
    return done


def _madvise(address: int, length: int, advice: int) -> bool:
    return _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0


def _missing_pages(address: int) -> int:
    """How many of the huge page's small pages are not in memory (mincore)."""
    vector = (ctypes.c_ubyte * (HUGE // PAGE))()
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(HUGE), vector) != 0:
        return HUGE // PAGE
    return sum(1 for byte in vector if not byte & 1)


def thp_allowed() -> bool:
    try:
        with open(THP_ENABLED) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def anonymous_ranges(maps: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """The 2 MiB-aligned parts of each private writable anonymous mapping (pymalloc's arenas, malloc's
    heap): where huge pages can go."""
    ranges = []
    with open(maps) as f:
        for line in f:
            fields = line.split()
            anonymous = len(fields) == 5 or fields[5] == "[heap]"
            if not (anonymous and fields[1] == "rw-p"):
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            start, end = -(-low // HUGE) * HUGE, high // HUGE * HUGE
            if end > start:
                ranges.append((start, end))
    return ranges
