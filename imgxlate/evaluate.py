"""Quality evaluation on held-out images, one function per task (see imgxlate.metrics for the protocols).

    eval_sr     per-image PSNR/SSIM of a model and of bicubic under the standard SR protocol,
                optionally with EDSR's 8-way geometric self-ensemble, plus same-region crops for a sheet
    eval_seg    per-image Dice / IoU / pixel accuracy of a segmentation model against its masks
    eval_style  per-image content loss and per-layer style losses of a style model

Each returns rows (dataclasses) that the CLI prints, saves as CSV and turns into pictures (imgxlate.plots).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from imgxlate import metrics
from imgxlate.augment import N_DIHEDRAL, dihedral, dihedral_inverse
from imgxlate.infer.predictor import model_device, predict_array, to_tensor, to_uint8
from imgxlate.models import build

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def list_images(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    return sorted(out)


def read_rgb_or_gray(path: str) -> np.ndarray:
    """uint8 HxW (grayscale files) or HxWx3."""
    with Image.open(path) as im:
        im = im.convert("L") if im.mode in ("L", "I;16", "I", "1") else im.convert("RGB")
        return np.asarray(im)


# ------------------------------------------------------------------------------------------------ SR
@torch.inference_mode()
def predict_ensemble(model, img: np.ndarray) -> np.ndarray:
    """EDSR's geometric self-ensemble (Lim et al. 2017, "EDSR+"): the model on all 8 symmetries of the
    input, each output transformed back, averaged in float, then quantised once."""
    device = model_device(model)
    x = to_tensor(img).to(device)
    acc = None
    for k in range(N_DIHEDRAL):
        y = dihedral_inverse(model(dihedral(x, k)).float(), k)
        acc = y if acc is None else acc + y
    return to_uint8(acc / N_DIHEDRAL)


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


def eval_sr(model, folder: str, scale: int, y_channel: bool = True, ensemble: bool = False,
            crop: int = 0) -> list[SrRow]:
    """Per-image PSNR/SSIM of ``model`` and of bicubic on the HR images under ``folder``:
    HR cropped to a multiple of the scale, LR by MATLAB bicubic, outputs quantised to uint8.
    ``crop`` > 0 keeps a ``crop``-pixel square of bicubic / model / HR from the same region of each image."""
    bicubic = build("bicubic", scale=scale)
    rows = []
    for path in list_images(folder):
        hr = metrics.mod_crop(read_rgb_or_gray(path), scale)
        rgb = np.repeat(hr[..., None], 3, axis=2) if hr.ndim == 2 else hr
        lr = metrics.imresize(rgb, 1 / scale)
        sr = predict_ensemble(model, lr) if ensemble else predict_array(model, lr)
        bic = predict_array(bicubic, lr)
        row = SrRow(
            image=os.path.relpath(path, folder), height=hr.shape[0], width=hr.shape[1],
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


def seg_pairs(folder: str, split: str = "all", val_fraction: float = 0.2, seed: int = 0) -> list[tuple[str, str]]:
    """(image, mask) pairs under ``folder`` (training's pairing rules); ``split='val'`` keeps only the groups
    (Carvana: cars) that training with the same ``val_fraction`` and ``seed`` held out."""
    from imgxlate.train import data

    pairs = data.pair_segmentation(data.list_images(folder))
    if split == "all":
        return pairs
    train, val = data.grouped_split(pairs, val_fraction, seed=seed)
    return val if split == "val" else train


def training_seg_settings(model) -> dict:
    """The evaluation size and split settings recorded in a seg artifact (last stage's size)."""
    prov = getattr(model, "meta", {}).get("provenance", {})
    cfg = prov.get("config", {})
    stages = prov.get("stages") or []
    return {"size": next((s["size"] for s in reversed(stages) if "size" in s), None),
            "val_fraction": cfg.get("val_fraction", 0.2), "seed": cfg.get("seed", 0)}


@torch.inference_mode()
def predict_mask_logits(model, img: np.ndarray, size: int | None) -> np.ndarray:
    """HxW float logits at the image's own resolution; the model sees the image resized to ``size`` square
    (the training size), or the image itself rounded to a multiple of 32 when ``size`` is None."""
    h, w = img.shape[:2]
    x = to_tensor(img)
    th, tw = (size, size) if size else (max(32, round(h / 32) * 32), max(32, round(w / 32) * 32))
    if (th, tw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
    device = model_device(model)
    logits = model(x.to(device)).float().cpu()[:, :1]
    if (th, tw) != (h, w):
        logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits[0, 0].numpy()


def eval_seg(model, pairs: list[tuple[str, str]], size: int | None = None, root: str = "",
             keep_pictures: bool = True) -> list[SegRow]:
    """Per-image Dice, IoU and pixel accuracy at the mask's own resolution (prediction: logit > 0)."""
    from imgxlate.train.data import read_mask, read_rgb

    rows = []
    for img_uri, mask_uri in pairs:
        img, mask = read_rgb(img_uri), read_mask(mask_uri).astype(bool)
        if img.shape[:2] != mask.shape:
            raise ValueError(f"{img_uri} is {img.shape[1]}x{img.shape[0]} but its mask {mask_uri} is "
                             f"{mask.shape[1]}x{mask.shape[0]}")
        logits = predict_mask_logits(model, img, size)
        pred = logits > 0
        rows.append(SegRow(
            image=posixpath.relpath(img_uri, root) if root else img_uri,
            mask=posixpath.relpath(mask_uri, root) if root else mask_uri,
            height=img.shape[0], width=img.shape[1],
            dice=metrics.dice(pred, mask), iou=metrics.iou(pred, mask),
            accuracy=metrics.pixel_accuracy(1 / (1 + np.exp(-logits)), mask), foreground=float(mask.mean()),
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


def square_content(img: np.ndarray, size: int) -> torch.Tensor:
    """The centre square of a photo resized to ``size`` (a multiple of 4 for the style net): (1, 3, s, s)."""
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    t = to_tensor(img[y:y + s, x:x + s])
    size = max(4, size // 4 * 4)
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


@torch.inference_mode()
def eval_style(model, images: list[str], style_image: np.ndarray, size: int = 256, vgg_weights: str = "imagenet",
               content_weight: float = 1e4, root: str = "") -> list[StyleRow]:
    """Content loss and per-layer style (Gram) losses of the stylised output of each content image, with the
    weights the training objective uses; lower is better for all."""
    from imgxlate.train.data import read_rgb
    from imgxlate.train.objectives import StyleObjective

    style = to_tensor(style_image)
    with torch.random.fork_rng():
        torch.manual_seed(0)            # 'random' VGG weights: the same loss network on every run
        objective = StyleObjective(style, vgg_weights, content_weight)
    names = objective.loss.names
    device = model_device(model)
    rows = []
    try:
        for uri in images:
            content = square_content(read_rgb(uri), size).to(device)
            out = model(content).float().clamp(0, 1)
            terms = [t.item() for t in objective.loss(out.cpu(), content.cpu(), sum_layers=False)]
            rows.append(StyleRow(image=posixpath.relpath(uri, root) if root else uri, loss=float(sum(terms)),
                                 terms=dict(zip(names, terms)),
                                 pictures={"content": to_uint8(content.cpu()), "stylised": to_uint8(out.cpu())}))
    finally:
        objective.loss.close()
    return rows


def mean_of(rows: list, fields: tuple[str, ...]) -> dict:
    return {f: float(np.mean([getattr(r, f) for r in rows])) for f in fields} if rows else {}
