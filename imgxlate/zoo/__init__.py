"""Models shipped inside the package, usable by name in every ``--model`` option (``sr-x2``, ...).

Each is an ordinary artifact folder beside this file (``weights.pt`` + ``config.json``), trained with
imgxlate's own ``imgxlate train`` on the data its provenance names; ``imgxlate models`` lists them with
their scores, and jobs/README.md logs how each was made.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    return sorted(d for d in os.listdir(HERE) if os.path.isfile(os.path.join(HERE, d, "config.json")))


def is_shipped(spec: str) -> bool:
    return isinstance(spec, str) and "/" not in spec and spec in names()


def path(name: str) -> str:
    if not is_shipped(name):
        raise KeyError(f"no shipped model {name!r}; shipped: {', '.join(names()) or 'none'}")
    return os.path.join(HERE, name)


def meta(name: str) -> dict:
    with open(os.path.join(path(name), "config.json")) as f:
        return json.load(f)


def unknown_name(spec: str) -> str | None:
    """Why ``spec`` names no model, when it reads as a model's name (no '/', no URI, nothing of that name here)
    and no shipped model has it: the shipped names, the nearest first; else None."""
    import difflib

    if not isinstance(spec, str) or "/" in spec or ":" in spec or spec == "bicubic" or os.path.exists(spec) \
            or is_shipped(spec):
        return None
    near = difflib.get_close_matches(spec, names() + ["bicubic"], n=2)
    return (f"no model named {spec!r}: " + (f"did you mean {' or '.join(near)}? " if near else "")
            + f"the shipped models are {', '.join(names()) or 'none'} (and bicubic); else give an artifact's "
              f"path or URI")

