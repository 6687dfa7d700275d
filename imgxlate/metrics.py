"""Image-quality and segmentation metrics: one implementation used by training, eval and benchmarks.

Everything here is NumPy only (no torch), on HxW or HxWxC arrays.

SR numbers follow the standard protocol of the SR literature (see ``../shared/data/README.md``):
LR made with MATLAB's ``imresize(hr, 1/s, 'bicubic')``, output quantised to uint8, compared on the
Y channel of ITU-R BT.601 with ``s`` pixels shaved from every border. Every printed number must name
its protocol; :data:`PROTOCOL_Y` and :data:`PROTOCOL_RGB` are the labels used throughout.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

PROTOCOL_Y = "Y, shave=scale, MATLAB bicubic LR"
PROTOCOL_RGB = "RGB, shave=scale, MATLAB bicubic LR"


# --------------------------------------------------------------------------------------------------
# MATLAB-compatible bicubic resize
# --------------------------------------------------------------------------------------------------

def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


@lru_cache(maxsize=256)
def resize_taps(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The bicubic taps of one axis (MATLAB's ``contributions``): weights (out_len, P), each row summing
    to 1, and 0-based source indices (out_len, P); output sample i is ``sum(w[i] * in[idx[i]])``.

    Shared by :func:`imresize` (through :func:`resize_matrix`) and the ``bicubic`` model, so the two resize
    alike. The arrays are cached: read them, do not write to them.

    As MATLAB: sample coordinate u = x/s + 0.5*(1 - 1/s) (x 1-based); when shrinking, the kernel is
    stretched by 1/s (antialiasing); out-of-range taps take the edge pixel (replicate).
    """
    if scale < 1:
        width = 4.0 / scale

        def kernel(x):
            return scale * _cubic(scale * x)
    else:
        width = 4.0
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based source positions
    w = kernel(u[:, None] - idx)
    w = w / w.sum(axis=1, keepdims=True)
    idx = np.clip(idx, 1, in_len).astype(np.int64) - 1
    keep = np.any(w != 0, axis=0)  # MATLAB drops all-zero tap columns
    return w[:, keep], idx[:, keep]


def resize_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """Dense (out_len, in_len) matrix M with out = M @ in along one axis (float64)."""
    w, idx = resize_taps(in_len, out_len, scale)
    m = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(out_len), idx.shape[1]), idx.ravel()), w.ravel())
    return m


def _round_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)  # half away from zero for x >= 0


def output_size(in_len: int, scale: float) -> int:
    return int(math.ceil(in_len * scale - 1e-9))


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` on an HxW or HxWxC array.

    uint8 input is rounded to uint8 after each of the two 1-D passes (rows first, then columns),
    which is what makes LR images match the published benchmarks bit for bit. Float input stays
    float (no rounding, no clipping).
    """
    is_uint8 = img.dtype == np.uint8
    x = img.astype(np.float64)
    h, w = x.shape[:2]
    for axis, n in ((0, h), (1, w)):
        m = resize_matrix(n, output_size(n, scale), scale)
        x = np.moveaxis(np.tensordot(m, np.moveaxis(x, axis, 0), axes=(1, 0)), 0, axis)
        if is_uint8:
            x = _round_uint8(x).astype(np.float64)
    return x.astype(np.uint8) if is_uint8 else x


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop HR to a multiple of the scale, keeping the top-left part (protocol step 1)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


# --------------------------------------------------------------------------------------------------
# PSNR / SSIM under the standard protocol
# --------------------------------------------------------------------------------------------------

def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of a uint8-range RGB image: 16 + (65.481 R + 128.553 G + 24.966 B) / 255."""
    x = img.astype(np.float64)
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def _is_gray(img: np.ndarray) -> bool:
    return img.ndim == 2 or img.shape[2] == 1


def _to_y_pair(sr: np.ndarray, hr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Y of both. A grayscale HR is its own Y (no rescaling); the output is then reduced to one
    channel by its channel mean (the network saw the gray image as 3 identical channels)."""
    if _is_gray(hr):
        hr_y = hr.reshape(hr.shape[:2]).astype(np.float64)
        sr_y = sr.astype(np.float64) if sr.ndim == 2 else sr.astype(np.float64).mean(axis=2)
        return sr_y, hr_y
    return rgb_to_y(sr), rgb_to_y(hr)


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    if sr.shape[:2] != hr.shape[:2]:
        raise ValueError(f"output {sr.shape[:2]} and reference {hr.shape[:2]} differ in size")


def _shave(x: np.ndarray, s: int) -> np.ndarray:
    return x[s:-s, s:-s] if s > 0 else x


def psnr(sr: np.ndarray, hr: np.ndarray, scale: int, y_channel: bool = True) -> float:
    """PSNR in dB between uint8 images (protocol: Y channel or RGB, ``scale`` px shaved)."""
    _check_pair(sr, hr)
    if y_channel:
        a, b = _to_y_pair(sr, hr)
    else:
        a, b = sr.astype(np.float64), hr.astype(np.float64)
    a, b = _shave(a, scale), _shave(b, scale)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D array with outer(g, g)."""
    k = len(g)
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ g


def ssim(sr: np.ndarray, hr: np.ndarray, scale: int, y_channel: bool = True) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03, L 255, valid filtering,
    mean of the map). On RGB it is the mean over channels."""
    _check_pair(sr, hr)
    if y_channel:
        pairs = [_to_y_pair(sr, hr)]
    else:
        a3, b3 = np.atleast_3d(sr).astype(np.float64), np.atleast_3d(hr).astype(np.float64)
        pairs = [(a3[..., c], b3[..., c]) for c in range(a3.shape[2])]
    g = _gaussian()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for a, b in pairs:
        a, b = _shave(a, scale), _shave(b, scale)
        mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
        var_a = _filter_valid(a * a, g) - mu_a**2
        var_b = _filter_valid(b * b, g) - mu_b**2
        cov = _filter_valid(a * b, g) - mu_a * mu_b
        num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
        den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        values.append(float(np.mean(num / den)))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------

def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice = 2|A n B| / (|A| + |B|) of two binary masks, as Carvana scored it (1 when both empty)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two binary masks (1 when both empty)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def pixel_accuracy(prob: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of pixels where ``prob > threshold`` equals the binary target."""
    return float(np.mean((np.asarray(prob) > threshold) == np.asarray(target, bool)))
