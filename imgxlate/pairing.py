"""Which mask belongs to which image, and which images validate: the segmentation pairing and
split rules, one home for training (imgxlate.train.tasks) and ``imgxlate eval seg --split``, so eval
scores exactly the images a run held out."""

from __future__ import annotations

import posixpath
import re

import numpy as np

from imgxlate.errors import CannotRun

CARVANA_MASK = r"(?P<stem>.+)_mask\.(gif|png)$"
CARVANA_GROUP = r"^(?P<group>[^_/]+)_"


class NoPairs(CannotRun, ValueError):
    """A folder with no image/mask pairs: a segmentation run or evaluation has nothing to work on (exit 2)."""


SIBLING_FOLDERS = (("images", "masks"), ("image", "label"), ("images", "labels"), ("image", "mask"))


def _mask_folders(folder: str) -> list[str]:
    """Sibling folders that may hold the masks of the images in ``folder``: ``masks/`` for ``images/``,
    ``label/`` for ``image/`` (SIBLING_FOLDERS), and ``<name>_masks/`` for ``<name>/`` (Kaggle's Carvana:
    ``train/`` + ``train_masks/``)."""
    parent, name = posixpath.split(folder)
    return [posixpath.join(parent, m) for m in [m for i, m in SIBLING_FOLDERS if i == name] + [f"{name}_masks"]]


def _is_mask_folder(folder: str) -> bool:
    name = posixpath.basename(folder)
    return name.endswith("_masks") or any(name == m for _, m in SIBLING_FOLDERS)


def pair_segmentation(uris: list[str], mask_pattern: str = CARVANA_MASK, limit: int | None = None
                      ) -> list[tuple[str, str]]:
    """(image, mask) pairs matched by file name, in listing order (at most ``limit``): a mask is
    ``<stem>_mask.gif|png`` (Carvana's ``<id>_<angle>.jpg`` / ``<id>_<angle>_mask.gif``), beside the image
    or in a sibling folder (``images/`` + ``masks/``, Kaggle's ``train/`` + ``train_masks/``), or has the
    image's own name in a sibling ``label/`` / ``labels/`` / ``masks/`` folder (ISBI)."""
    rx = re.compile(mask_pattern)
    by_stem = {posixpath.splitext(u)[0]: u for u in uris}
    masks, images = {}, []
    for u in uris:
        m = rx.search(posixpath.basename(u))
        if m:
            masks[posixpath.join(posixpath.dirname(u), m.group("stem"))] = u
        elif not _is_mask_folder(posixpath.dirname(u)):
            images.append(u)
    pairs = []
    for u in images:
        stem = posixpath.splitext(u)[0]
        folder, name = posixpath.split(stem)
        candidates = [masks.get(stem)]
        for mask_folder in _mask_folders(folder):
            alt = posixpath.join(mask_folder, name)
            candidates += [masks.get(alt), by_stem.get(alt)]
        mask = next((c for c in candidates if c), None)
        if mask is not None:
            pairs.append((u, mask))
            if limit and len(pairs) == limit:
                break
    if not pairs:
        raise NoPairs("no image/mask pairs found (expected <name>.jpg with <name>_mask.gif, or images/ + masks/, "
                         "train/ + train_masks/, or image/ + label/)")
    return pairs


def grouped_split(pairs: list[tuple[str, str]], val_fraction: float, group_pattern: str = CARVANA_GROUP,
                  seed: int = 0) -> tuple[list, list]:
    """Train/validation split by group (e.g. the car id), so no group is in both."""
    rx = re.compile(group_pattern)

    def group(p):
        m = rx.search(posixpath.basename(p[0]))
        return m.group("group") if m else posixpath.basename(p[0])
    groups = sorted({group(p) for p in pairs})
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    n_val = max(1, round(len(groups) * val_fraction)) if len(groups) > 1 else 0
    val_groups = set(groups[:n_val])
    return [p for p in pairs if group(p) not in val_groups], [p for p in pairs if group(p) in val_groups]
