"""Quality evaluation on held-out images, one function per task (see imgxlate.metrics for the protocols).

    eval_sr     per-image PSNR/SSIM of a model and of bicubic under the standard SR protocol,
                optionally with EDSR's 8-way geometric self-ensemble, plus same-region crops for a sheet
    eval_seg    per-image Dice / IoU / pixel accuracy of a segmentation model against its masks
    eval_style  per-image content loss and per-layer style losses of a style model

Each returns rows (dataclasses) that imgxlate.eval_report prints, saves as CSV and Parquet and turns into
pictures (imgxlate.plots); training validation scores with the same functions. What they share with training
(degradations, segmentation pairing, the style loss) lives beside both: imgxlate.degrade, imgxlate.pairing,
imgxlate.losses. Nothing here imports imgxlate.train.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from imgxlate import degrade, losses, metrics, pairing
from imgxlate.errors import CannotRun
from imgxlate.infer.predictor import PredictOptions, Predictor, model_device, to_tensor
from imgxlate.io import images, listing
from imgxlate.models import build

Named = tuple[str, np.ndarray]             # (name shown in results, decoded uint8 image)


def list_images(src: str, exclude: str | None = None) -> list[listing.Item]:
    """Images under a folder / s3:// prefix or in a manifest, through the batch job's listing; nothing under
    ``exclude`` (eval's --out, when it lies inside the data: its sheets are no test images)."""
    return listing.list_inputs(src, listing.IMAGE_EXTS, exclude=exclude)


class UnreadableImage(CannotRun, ValueError):
    """A scored image (or mask) that cannot be decoded: a score over the rest would not be the data set's."""


def _read(uri: str, reader, what: str = ""):
    try:
        return reader(uri)
    except (ValueError, OSError) as e:          # a decode error, a file that is not there (a store's: retried)
        raise UnreadableImage(f"{listing.redact(what or uri)} cannot be read ({type(e).__name__}: {e}); a score is "
                              f"over every image of its data set: fix or remove it") from None


def read_named(src: str, reader=images.read_image, exclude: str | None = None) -> list[Named]:
    return [(it.key, _read(it.source_uri, reader)) for it in list_images(src, exclude)]


# ------------------------------------------------------------------------------------------------ SR
@dataclass
class SrRow:
    image: str
    height: int
    width: int
    psnr: float
    ssim: float
    psnr_bicubic: float
    ssim_bicubic: float
    crop: dict | None = field(default=None, repr=False)   # same-region uint8 crops: bicubic, model, hr


def detail_window(img: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` square with the most gradient energy (where SR differences show),
    searched on a grid of quarter-window steps; chosen from the ground truth only."""
    g = img.astype(np.float32) if img.ndim == 2 else img.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1, :]
    h, w = energy.shape
    if h < size or w < size:
        return 0, 0
    cum = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, size // 4)
    best, at = -1.0, (0, 0)
    for y in range(0, h - size + 1, step):
        for x in range(0, w - size + 1, step):
            e = cum[y + size, x + size] - cum[y, x + size] - cum[y + size, x] + cum[y, x]
            if e > best:
                best, at = e, (y, x)
    return at


def eval_sr(predictor: Predictor, hr_images: Iterable[Named], scale: int, y_channel: bool = True,
            crop: int = 0, degradations: str = "none", seed: int = 0, first_index: int = 0) -> list[SrRow]:
    """Per-image PSNR/SSIM of the predictor's model and of bicubic on HR images: HR cropped to a multiple
    of the scale, LR by MATLAB bicubic, the model run by ``predictor`` (its contract, tiles and
    self-ensemble: the batch job's outputs for the same LR files), outputs quantised to uint8.
    ``crop`` > 0 keeps a ``crop``-pixel square of bicubic / model / HR from the same region of each image.
    ``degradations`` (a preset of imgxlate.degrade, e.g. 'restore') degrades each LR image as training
    did (JPEG, noise, blur), drawn from a generator seeded by (``seed``, image index): model and bicubic see
    the same degraded input, and the reference is the clean HR. ``first_index``: the index of the first image in
    the whole set, when these are a share of it (training's validation, shared by its workers)."""
    sampler = degrade.PRESETS[degradations]
    bicubic = Predictor(build("bicubic", scale=scale), device="cpu", options=PredictOptions(tile=1 << 30))
    rows = []
    for i, (name, img) in enumerate(hr_images, first_index):
        hr = metrics.mod_crop(img, scale)
        rgb = np.repeat(hr[..., None], 3, axis=2) if hr.ndim == 2 else hr
        lr = metrics.imresize(rgb, 1 / scale) if scale > 1 else rgb
        if sampler.active:
            lr = degrade.apply(lr, sampler.sample(np.random.default_rng([seed, i])))
        sr, bic = predictor.predict(lr), bicubic.predict(lr)
        row = SrRow(
            image=name, height=hr.shape[0], width=hr.shape[1],
            psnr=metrics.psnr(sr, hr, scale, y_channel), ssim=metrics.ssim(sr, hr, scale, y_channel),
            psnr_bicubic=metrics.psnr(bic, hr, scale, y_channel),
            ssim_bicubic=metrics.ssim(bic, hr, scale, y_channel),
        )
        if crop:
            c = min(crop, hr.shape[0], hr.shape[1])
            y, x = detail_window(rgb, c)
            row.crop = {k: v[y:y + c, x:x + c] for k, v in (("bicubic", bic), ("model", sr), ("hr", rgb))}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- seg
@dataclass
class SegRow:
    image: str
    mask: str
    height: int
    width: int
    dice: float
    iou: float
    accuracy: float
    foreground: float                      # fraction of ground-truth foreground pixels
    pictures: dict | None = field(default=None, repr=False)   # photo, predicted and true masks


def seg_pairs(folder: str, split: str = "all", val_fraction: float = 0.2, seed: int = 0,
              limit: int | None = None, exclude: str | None = None) -> list[tuple[str, str]]:
    """(image, mask) pairs under ``folder`` (training's pairing rules); ``split='val'`` keeps only the groups
    (Carvana: cars) that training with the same ``val_fraction``, ``seed`` and ``limit`` (its --limit: the first
    pairs, split among themselves) held out."""
    pairs = pairing.pair_segmentation([it.source_uri for it in list_images(folder, exclude)],
                                      limit=limit if split != "all" else None)
    if split == "all":
        return pairs
    train, val = pairing.grouped_split(pairs, val_fraction, seed=seed)
    return val if split == "val" else train


def training_seg_settings(meta: dict) -> dict:
    """The split settings recorded in a seg artifact's provenance."""
    cfg = meta.get("provenance", {}).get("config", {})
    return {"val_fraction": cfg.get("val_fraction", 0.2), "seed": cfg.get("seed", 0), "limit": cfg.get("limit")}


def read_seg_pair(img_uri: str, mask_uri: str) -> tuple[np.ndarray, np.ndarray]:
    img, mask = images.read_rgb(img_uri), images.read_mask(mask_uri).astype(bool)
    if img.shape[:2] != mask.shape:
        raise ValueError(f"{img_uri} is {img.shape[1]}x{img.shape[0]} but its mask {mask_uri} is "
                         f"{mask.shape[1]}x{mask.shape[0]}")
    return img, mask


def read_seg_samples(pairs: list[tuple[str, str]], root: str = "") -> Iterable[tuple]:
    """Decoded (name, mask name, image, mask) for eval_seg, read one pair at a time."""
    for img_uri, mask_uri in pairs:
        img, mask = _read(img_uri, functools.partial(read_seg_pair, mask_uri=mask_uri), f"{img_uri} or {mask_uri}")
        yield (posixpath.relpath(img_uri, root) if root else img_uri,
               posixpath.relpath(mask_uri, root) if root else mask_uri, img, mask)


def eval_seg(predictor: Predictor, samples: Iterable[tuple[str, str, np.ndarray, np.ndarray]],
             keep_pictures: bool = True) -> list[SegRow]:
    """Per-image Dice, IoU and pixel accuracy of the masks ``predictor`` writes (its contract: the batch
    job's masks for the same images), scored at the mask's own resolution.
    ``samples``: (image name, mask name, uint8 HxWx3 image, bool HxW mask)."""
    rows = []
    for name, mask_name, img, mask in samples:
        pred = predictor.predict(img) > 0
        rows.append(SegRow(
            image=name, mask=mask_name, height=img.shape[0], width=img.shape[1],
            dice=metrics.dice(pred, mask), iou=metrics.iou(pred, mask),
            accuracy=float(np.mean(pred == mask)), foreground=float(mask.mean()),
            pictures={"photo": img, "pred": pred, "true": mask} if keep_pictures else None,
        ))
    return rows


# --------------------------------------------------------------------------------------------- style
@dataclass
class StyleRow:
    image: str
    loss: float                            # content + style, as trained
    terms: dict                            # 'content' and one 'style_<layer>' per VGG block
    pictures: dict | None = field(default=None, repr=False)   # content and stylised uint8


def centre_square(img: np.ndarray, size: int) -> np.ndarray:
    """The centre square of side min(h, w, size): the crop training's style loss saw (native pixel scale)."""
    h, w = img.shape[:2]
    s = min(h, w, size)
    y, x = (h - s) // 2, (w - s) // 2
    return img[y:y + s, x:x + s]


@torch.inference_mode()
def eval_style(predictor: Predictor, content_images: Iterable[Named], style_image: np.ndarray, size: int = 256,
               vgg_weights: str = "imagenet", content_weight: float = 1e4, loss: losses.StyleLoss | None = None,
               style_size: int | None = None) -> list[StyleRow]:
    """Content loss and per-layer style (Gram) losses of each stylised image, with the weights the training
    objective uses (lower is better for all); the style image's Gram targets at ``style_size`` as training
    computed them (imgxlate.losses.style_loss; training validation passes its own ``loss``). The stylised
    image is what ``predictor`` writes (its contract: the batch job's output); the losses are measured on
    its centre ``size`` square."""
    own = loss is None
    if own:
        with torch.random.fork_rng():
            torch.manual_seed(0)            # 'random' VGG weights: the same loss network on every run
            loss = losses.style_loss(style_image, style_size, vgg_weights, content_weight)
    names = loss.names
    rows = []
    try:
        for name, img in content_images:
            img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
            out = predictor.predict(img)
            device = model_device(loss)
            content = to_tensor(centre_square(img, size)).to(device)
            stylised = to_tensor(centre_square(out, size)).to(device)
            terms = [t.item() for t in loss(stylised, content, sum_layers=False)]
            rows.append(StyleRow(image=name, loss=float(sum(terms)), terms=dict(zip(names, terms)),
                                 pictures={"content": img, "stylised": out}))
    finally:
        if own:
            loss.close()
    return rows


def mean_of(rows: list, fields: tuple[str, ...]) -> dict:
    return {f: float(np.mean([getattr(r, f) for r in rows])) for f in fields} if rows else {}
