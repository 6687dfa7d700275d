"""The one console voice of imgxlate: ``[imgxlate] ...`` lines on standard error (progress, notices, errors)."""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings

_QUIET = threading.Lock()


def log(msg: str) -> None:
    line(f"[imgxlate] {msg}")


def line(text: str) -> None:
    """``text`` and its newline in one write: print() writes them in two, between which another thread's line
    (the progress, while a command reports its error) can land."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def quiet(category: type[Warning] = Warning):
    """Warnings of ``category`` silenced for the block. ``warnings.catch_warnings`` swaps process-wide state, and
    threads that enter and leave it out of order leave it corrupt (a filter that silences every warning for good):
    an in-process run's blocks run in threads, so imgxlate's every use goes through this one lock."""
    with _QUIET, warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        yield
