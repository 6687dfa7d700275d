"""The one console voice of imgxlate: ``[imgxlate] ...`` lines on standard error (progress, notices, errors)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(f"[imgxlate] {msg}", file=sys.stderr, flush=True)
