"""Datasets for training, read through the same storage and codec code as the batch job.

Choice: map-style datasets over fsspec (local or s3://) with a DistributedSampler, not Ray Data
streaming. SR, style and segmentation training sets are small (hundreds of images) and are read
once and cached in memory, while every epoch draws fresh random crops, symmetries and degradations
from a generator seeded by (seed, epoch, index): the samples are reproducible, independent of the
number of workers, and an epoch resumes exactly from a checkpoint.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from imgxlate import metrics
from imgxlate.augment import dihedral
from imgxlate.io import listing
from imgxlate.io.images import read_mask, read_rgb
from imgxlate.train.degrade import DegradationSampler, apply


def list_images(src: str, limit: int | None = None) -> list[str]:
    return [it.source_uri for it in listing.list_inputs(src, listing.IMAGE_EXTS, limit)]


def to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)


class _Epoch(Dataset):
    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


class _Crops(_Epoch):
    """``samples_per_image`` random square crops of each (cached) image per epoch."""

    def __init__(self, uris: list[str], samples_per_image: int, seed: int):
        self.images = [read_rgb(u) for u in uris]
        self.samples_per_image, self.seed = samples_per_image, seed

    def __len__(self):
        return len(self.images) * self.samples_per_image

    def random_crop(self, index: int, size: int, multiple: int = 1) -> tuple[np.random.Generator, np.ndarray]:
        rng = self.rng(index)
        img = self.images[index % len(self.images)]
        h, w = img.shape[:2]
        c = min(size, h - h % multiple, w - w % multiple)
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        return rng, img[y:y + c, x:x + c]


class SrDataset(_Crops):
    """(LR, HR) pairs: a random HR crop, LR by MATLAB bicubic (as the benchmarks make it), one of the
    8 symmetries on both, and an optional degradation of the LR only."""

    def __init__(self, uris: list[str], scale: int, hr_crop: int, samples_per_image: int = 1,
                 degradations: DegradationSampler | None = None, seed: int = 0):
        super().__init__(uris, samples_per_image, seed)
        self.scale, self.hr_crop, self.degradations = scale, hr_crop - hr_crop % scale, degradations

    def __getitem__(self, index):
        rng, crop = self.random_crop(index, self.hr_crop, self.scale)
        k = int(rng.integers(8))
        hr = np.ascontiguousarray(dihedral(torch.from_numpy(crop.copy()).permute(2, 0, 1), k).permute(1, 2, 0).numpy())
        lr = metrics.imresize(hr, 1 / self.scale) if self.scale > 1 else hr
        if self.degradations is not None and self.degradations.active:
            lr = apply(lr, self.degradations.sample(rng))
        return to_chw(lr), to_chw(hr)


class CropDataset(_Crops):
    """Random square crops with a random left-right flip (style-transfer content images)."""

    def __init__(self, uris: list[str], size: int, samples_per_image: int = 1, seed: int = 0):
        super().__init__(uris, samples_per_image, seed)
        self.size = size

    def __getitem__(self, index):
        rng, crop = self.random_crop(index, self.size)
        t = to_chw(crop)
        if t.shape[-1] != self.size:
            t = torch.nn.functional.interpolate(t[None], size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        return (dihedral(t, int(rng.integers(2)) * 4),)   # left-right flip only: photos stay upright


CARVANA_MASK = r"(?P<stem>.+)_mask\.(gif|png)$"
CARVANA_GROUP = r"^(?P<group>[^_/]+)_"


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
        raise ValueError("no image/mask pairs found (expected <name>.jpg with <name>_mask.gif, or images/ + masks/, "
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


@dataclass
class SegSample:
    image: torch.Tensor
    mask: torch.Tensor


class SegDataset(_Epoch):
    """Images and binary masks at ``size`` x ``size``: geometry on both (mask nearest-neighbour),
    photometric jitter on the image only."""

    def __init__(self, pairs: list[tuple[str, str]], size: int, augment: bool = True, seed: int = 0):
        self.images = [read_rgb(i) for i, _ in pairs]
        self.masks = [read_mask(m) for _, m in pairs]
        self.size, self.augment, self.seed = size, augment, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from torchvision.transforms import v2

        from imgxlate.augment import as_pair, segmentation_transform

        img, mask = to_chw(self.images[index]), torch.from_numpy(self.masks[index])[None]
        torch_gen_seed = int(self.rng(index).integers(2**31))
        if self.augment:
            with torch.random.fork_rng():
                torch.manual_seed(torch_gen_seed)
                img, mask = segmentation_transform(self.size)(*as_pair(img, mask))
        else:
            img, mask = v2.Resize((self.size, self.size), antialias=True)(*as_pair(img, mask))
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).float()
