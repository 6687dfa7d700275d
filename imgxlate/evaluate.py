"""Quality evaluation under the standard protocols (see imgxlate.metrics)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgxlate import metrics
from imgxlate.infer.predictor import predict_array
from imgxlate.models import build

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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


@dataclass
class SrRow:
    image: str
    height: int
    width: int
    psnr: float
    ssim: float
    psnr_bicubic: float
    ssim_bicubic: float


def eval_sr(model, folder: str, scale: int, y_channel: bool = True) -> list[SrRow]:
    """Per-image PSNR/SSIM of ``model`` and of bicubic on the HR images under ``folder``:
    HR cropped to a multiple of the scale, LR by MATLAB bicubic, outputs quantised to uint8."""
    bicubic = build("bicubic", scale=scale)
    rows = []
    for path in list_images(folder):
        hr = metrics.mod_crop(read_rgb_or_gray(path), scale)
        rgb = np.repeat(hr[..., None], 3, axis=2) if hr.ndim == 2 else hr
        lr = metrics.imresize(rgb, 1 / scale)
        sr, bic = predict_array(model, lr), predict_array(bicubic, lr)
        rows.append(SrRow(
            image=os.path.relpath(path, folder), height=hr.shape[0], width=hr.shape[1],
            psnr=metrics.psnr(sr, hr, scale, y_channel), ssim=metrics.ssim(sr, hr, scale, y_channel),
            psnr_bicubic=metrics.psnr(bic, hr, scale, y_channel),
            ssim_bicubic=metrics.ssim(bic, hr, scale, y_channel),
        ))
    return rows
