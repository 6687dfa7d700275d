"""The driver's C heap, kept from creeping up over a long run.

A run's driver handles a steady churn of small and mid-sized allocations (Ray's core worker receiving blocks,
Arrow, the book's manifest parts) across some forty threads. With glibc's defaults its heap grew by about
5 MB per 100 s while what was in use stayed flat (``mallinfo2``: in use 182-184 MB, free 9 -> 22 MB over a
300k-input run): freed space fragments across per-thread arenas, and glibc's dynamic mmap threshold moves
blocks of up to 32 MB into the heap once one such block has been freed. With the settings below the same run's
RssAnon stayed at 497-509 MB (504 -> 520 with the defaults), and a 1M run's at 499-515 MB for its whole
length (``jobs/bench_translate.py --mode scale`` measures it from 10k to 1M inputs).

Only glibc has these knobs; elsewhere both functions do nothing. They change this process only: Ray's workers
keep their own allocator settings."""

from __future__ import annotations

import ctypes
import platform
import time

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 64 << 10   # blocks this big are mmapped and handed back when freed (fixed: no dynamic threshold)
ARENA_MAX = 2               # the driver's threads mostly wait on Ray; two arenas are plenty
COMPUTE_MMAP_THRESHOLD = 32 << 20
TRIM_EVERY_S = 10.0

_libc = None
_last_trim = 0.0
_mmapped = False            # steady() set the mmap threshold in this process


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                _libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass
    return _libc


def arenas() -> bool:
    """Cap the driver's arenas (before its threads start: arenas made earlier stay). Returns whether it could."""
    libc = _glibc()
    return bool(libc) and bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX))


def steady() -> bool:
    """Set the driver's allocator for a long run on Ray: :func:`arenas`, and blocks of 64 KB and more mmapped and
    handed back when freed. Not for a process that runs the model itself (inprocess.py): every activation tensor
    would then be a fresh mmap, page-faulted in, which made a model call 1.3-1.6x slower (:func:`compute` sets a
    threshold for that). Returns whether it could."""
    global _mmapped
    libc = _glibc()
    if not libc:
        return False
    _mmapped = True
    return arenas() & bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def compute() -> None:
    """The heap for running the model in this process: after :func:`steady`, blocks under 32 MB (glibc's highest
    dynamic threshold; glibc's own dynamic threshold cannot be had back once set) come from the heap again,
    reused without page faults."""
    libc = _glibc()
    if libc and _mmapped:
        libc.mallopt(M_MMAP_THRESHOLD, COMPUTE_MMAP_THRESHOLD)


def trim(every_s: float = TRIM_EVERY_S) -> bool:
    """Hand free heap pages back to the system, at most once every ``every_s`` seconds (a few ms each).
    Returns whether it trimmed."""
    global _last_trim
    libc = _glibc()
    now = time.monotonic()
    if not libc or now - _last_trim < every_s:
        return False
    _last_trim = now
    libc.malloc_trim(0)
    return True
