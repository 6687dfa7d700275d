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
