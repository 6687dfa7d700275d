"""Datasets for training, read through the same storage and codec code as the batch job.

Choice: map-style datasets over fsspec (local or s3://) with a DistributedSampler, not Ray Data
streaming. A dataset holds URIs; an image is read and decoded when the worker's sampler first draws
one of its samples, and kept in a least-recently-used cache bounded by bytes (``cache_mb``) that the
stages of a run share, so a set larger than a worker's memory trains, and a set that fits is decoded
once. Every epoch draws fresh random crops, symmetries and degradations from a generator seeded by
(seed, epoch, index): the samples are reproducible, independent of the number of workers and of what
is cached, and an epoch resumes exactly from a checkpoint. Decisions that need every image's size
(which are too small for the crop, the median size of the segmentation images) read image headers
only (:func:`imgxlate.io.images.image_size`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from imgxlate import metrics
from imgxlate.augment import dihedral
from imgxlate.degrade import DegradationSampler, apply
from imgxlate.io import listing
from imgxlate.io.images import read_mask, read_rgb

DEFAULT_CACHE_MB = 1024


def list_items(src: str, limit: int | None = None, exclude: str | None = None) -> list[listing.Item]:
    """Images under a folder / prefix or in a manifest (URI and key), through the batch job's listing; nothing
    under ``exclude`` (the run's --storage, when it lies inside the data: its curves are no training images)."""
    return listing.list_inputs(src, listing.IMAGE_EXTS, limit, exclude)


def list_images(src: str, limit: int | None = None) -> list[str]:
    return [it.source_uri for it in list_items(src, limit)]


def held_out_split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random ``fraction`` of ``items`` (at least one) held out for
    validation and never trained on; the same items and seed give the same split on every worker."""
    if len(items) < 2:
        return list(items), []
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(np.random.default_rng(seed).permutation(len(items))[:n_val].tolist())
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


class ImageCache:
    """Decoded images (arrays, or tuples of arrays) by key, bounded by bytes: the least recently used
    go first. An image larger than the whole cache is decoded for each use and not kept."""

    def __init__(self, max_mb: float = DEFAULT_CACHE_MB):
        self.max_bytes = int(max_mb * 2**20)
        self._items: OrderedDict = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    def __len__(self):
        return len(self._items)

    def get(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = load()
        size = value.nbytes
        if size <= self.max_bytes:
            self._items[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes
        return value


_SHARED: ImageCache | None = None


def shared_cache(max_mb: float = DEFAULT_CACHE_MB) -> ImageCache:
    """The process's cache, shared by the stages of a run (a later stage decodes nothing the earlier one
    kept); a new size starts an empty cache."""
    global _SHARED
    if _SHARED is None or _SHARED.max_bytes != int(max_mb * 2**20):
        _SHARED = ImageCache(max_mb)
    return _SHARED


def to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)


class _Epoch(Dataset):
    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def at(self, index) -> int:
        """The sample index of a plain index, or of an (epoch, index) pair from :class:`EpochSampler`, whose
        epoch it takes: a loader process kept across epochs holds its own copy of the dataset, which set_epoch
        in the main process never reaches."""
        if isinstance(index, tuple):
            self.epoch, index = index
        return index

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


class EpochSampler(Sampler):
    """``sampler``'s indices as (epoch, index) pairs. The sampler runs in the main process, so the epoch set here
    reaches DataLoader processes that live across epochs (and keep their image caches)."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


def split_cache(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each loader process keeps its share of the cache's budget (each has its own
    copy of the cache, so that n of them hold what one would)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    cache = getattr(info.dataset, "cache", None)
    if cache is not None:
        cache.max_bytes //= info.num_workers


class _Crops(_Epoch):
    """``samples_per_image`` random square crops of each image per epoch; an image is read when a sample
    of it is first drawn, then served from ``cache``."""

    def __init__(self, uris: list[str], samples_per_image: int, seed: int, cache: ImageCache | None = None):
        self.uris = list(uris)
        self.samples_per_image, self.seed = samples_per_image, seed
        self.cache = cache if cache is not None else ImageCache()

    def __len__(self):
        return len(self.uris) * self.samples_per_image

    def image(self, i: int) -> np.ndarray:
        uri = self.uris[i]
        return self.cache.get(("rgb", uri), lambda: read_rgb(uri))

    def random_crop(self, index: int, size: int, multiple: int = 1) -> tuple[np.random.Generator, np.ndarray]:
        rng = self.rng(index)
        img = self.image(index % len(self.uris))
        h, w = img.shape[:2]
        c = min(size, h - h % multiple, w - w % multiple)
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        return rng, img[y:y + c, x:x + c]


class SrDataset(_Crops):
    """(LR, HR) pairs: a random HR crop, LR by MATLAB bicubic (as the benchmarks make it), one of the
    8 symmetries on both, and an optional degradation of the LR only."""

    def __init__(self, uris: list[str], scale: int, hr_crop: int, samples_per_image: int = 1,
                 degradations: DegradationSampler | None = None, seed: int = 0, cache: ImageCache | None = None):
        super().__init__(uris, samples_per_image, seed, cache)
        self.scale, self.hr_crop, self.degradations = scale, sr_crop(hr_crop, scale), degradations

    def __getitem__(self, index):
        index = self.at(index)
        rng, crop = self.random_crop(index, self.hr_crop, self.scale)
        if crop.shape[0] != self.hr_crop:
            raise ValueError(f"{self.uris[index % len(self.uris)]} is smaller than the {self.hr_crop} px HR crop "
                             f"(training skips such images: imgxlate.train.tasks.SrTask.plan)")
        k = int(rng.integers(8))
        hr = np.ascontiguousarray(dihedral(torch.from_numpy(crop.copy()).permute(2, 0, 1), k).permute(1, 2, 0).numpy())
        lr = metrics.imresize(hr, 1 / self.scale) if self.scale > 1 else hr
        if self.degradations is not None and self.degradations.active:
            lr = apply(lr, self.degradations.sample(rng))
        return to_chw(lr), to_chw(hr)


def sr_crop(hr_crop: int, scale: int) -> int:
    """The HR crop side a scale uses: ``hr_crop`` rounded down to a multiple of the scale."""
    return hr_crop - hr_crop % scale


class CropDataset(_Crops):
    """Random square crops with a random left-right flip (style-transfer content images); an image
    smaller than the crop gives its largest square, resized to the crop."""

    def __init__(self, uris: list[str], size: int, samples_per_image: int = 1, seed: int = 0,
                 cache: ImageCache | None = None):
        super().__init__(uris, samples_per_image, seed, cache)
        self.size = size

    def __getitem__(self, index):
        index = self.at(index)
        rng, crop = self.random_crop(index, self.size)
        t = to_chw(crop)
        if t.shape[-1] != self.size:
            t = torch.nn.functional.interpolate(t[None], size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        return (dihedral(t, int(rng.integers(2)) * 4),)   # left-right flip only: photos stay upright


@dataclass
class SegSample:
    image: torch.Tensor
    mask: torch.Tensor


class SegDataset(_Epoch):
    """Images and binary masks at ``size`` x ``size``: geometry on both (mask nearest-neighbour),
    photometric jitter on the image only. A pair is read when first drawn, then served from ``cache``."""

    def __init__(self, pairs: list[tuple[str, str]], size: int, augment: bool = True, seed: int = 0,
                 cache: ImageCache | None = None):
        self.pairs = list(pairs)
        self.size, self.augment, self.seed = size, augment, seed
        self.cache = cache if cache is not None else ImageCache()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        from torchvision.transforms import v2

        from imgxlate.augment import as_pair, segmentation_transform

        index = self.at(index)
        img_uri, mask_uri = self.pairs[index]
        image = self.cache.get(("rgb", img_uri), lambda: read_rgb(img_uri))
        mask = self.cache.get(("mask", mask_uri), lambda: read_mask(mask_uri))
        img, mask = to_chw(image), torch.from_numpy(mask)[None]
        torch_gen_seed = int(self.rng(index).integers(2**31))
        if self.augment:
            with torch.random.fork_rng():
                torch.manual_seed(torch_gen_seed)
                img, mask = segmentation_transform(self.size)(*as_pair(img, mask))
        else:
            img, mask = v2.Resize((self.size, self.size), antialias=True)(*as_pair(img, mask))
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).float()
