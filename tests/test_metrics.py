"""imresize, PSNR, SSIM and the segmentation metrics against values derived from their definitions."""

import math

import numpy as np
import pytest
import torch

from imgxlate import metrics
from imgxlate.models import build

from conftest import photo


def keys(x):
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x <= 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


def by_hand_1d(v, scale):
    """MATLAB bicubic along one axis, written out per output sample (1-based coordinates)."""
    n = len(v)
    out_len = math.ceil(n * scale)
    out = []
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        if scale < 1:
            width, k = 4 / scale, (lambda d: scale * keys(scale * d))
        else:
            width, k = 4.0, keys
        left = math.floor(u - width / 2)
        taps = [(j, k(u - j)) for j in range(left, left + math.ceil(width) + 2)]
        total = sum(w for _, w in taps)
        out.append(sum(w / total * v[min(max(j, 1), n) - 1] for j, w in taps))  # replicate edges
    return np.array(out)


@pytest.mark.parametrize("scale", [0.5, 0.25, 2.0, 3.0, 1 / 3])
def test_imresize_float_matches_definition(scale):
    img = np.random.default_rng(1).uniform(0, 255, (9, 7))
    rows = np.stack([by_hand_1d(img[:, c], scale) for c in range(img.shape[1])], axis=1)
    expected = np.stack([by_hand_1d(rows[r], scale) for r in range(rows.shape[0])], axis=0)
    np.testing.assert_allclose(metrics.imresize(img, scale), expected, atol=1e-9)


def test_imresize_uint8_rounds_after_each_pass_rows_first():
    img = photo(12, 10, seed=3)
    got = metrics.imresize(img, 0.5)
    for c in range(3):
        rows = np.stack([by_hand_1d(img[:, j, c].astype(float), 0.5) for j in range(10)], axis=1)
        rows = np.clip(np.floor(rows + 0.5), 0, 255)
        cols = np.stack([by_hand_1d(rows[i], 0.5) for i in range(rows.shape[0])], axis=0)
        np.testing.assert_array_equal(got[..., c], np.clip(np.floor(cols + 0.5), 0, 255).astype(np.uint8))
    assert got.shape == (6, 5, 3) and got.dtype == np.uint8


def test_imresize_constant_image_stays_constant_and_sizes_are_ceil():
    img = np.full((7, 5, 3), 123, np.uint8)
    out = metrics.imresize(img, 1 / 3)
    assert out.shape == (3, 2, 3) and (out == 123).all()


def test_bicubic_model_equals_imresize_on_uint8_images(monkeypatch):
    from imgxlate.models import bicubic

    lr = photo(20, 17, seed=2)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255

    def out(scale):
        return build("bicubic", scale=scale)(x)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()

    for scale in (2, 3, 4, 0.5):               # small axes: one product with the dense matrix, as imresize
        np.testing.assert_array_equal(out(scale), metrics.imresize(lr, scale))
    monkeypatch.setattr(bicubic, "DENSE_MAX", 0)   # large axes gather their taps instead
    for scale in (2, 4):
        np.testing.assert_array_equal(out(scale), metrics.imresize(lr, scale))
    # At x3 the kernel weights are thirds, so some samples sit exactly on a .5 rounding tie that
    # summation order decides: allow those to differ by one level.
    diff = np.abs(out(3).astype(int) - metrics.imresize(lr, 3).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_bicubic_under_autocast_stays_in_the_input_precision():
    x = torch.rand(1, 3, 24, 20)
    model = build("bicubic", scale=2, matlab_uint8=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.float32 and torch.equal(y, model(x))


def test_psnr_by_hand_y_channel_and_shave():
    hr = np.zeros((10, 10, 3), np.uint8)
    sr = hr.copy()
    sr[2:8, 2:8] = 10                          # inside the shaved border of 2
    sr[0, 0] = 255                             # inside the shave: must not count
    y_diff = 10 * (65.481 + 128.553 + 24.966) / 255   # Y difference of an RGB step of 10
    mse = y_diff**2  # every unshaved pixel (6x6 of the 6x6 centre) differs
    assert metrics.psnr(sr, hr, scale=2) == pytest.approx(10 * math.log10(255**2 / mse))
    assert metrics.psnr(sr, hr, scale=2, y_channel=False) == pytest.approx(10 * math.log10(255**2 / 100))
    assert metrics.psnr(hr, hr, scale=2) == math.inf


def test_grayscale_reference_is_its_own_y():
    hr = np.full((8, 8), 100, np.uint8)
    sr = np.full((8, 8, 3), 104, np.uint8)    # 3 identical channels from the network
    assert metrics.psnr(sr, hr, scale=1) == pytest.approx(10 * math.log10(255**2 / 16))


def test_ssim_by_hand():
    a = photo(30, 30, seed=4)
    assert metrics.ssim(a, a, scale=2) == pytest.approx(1.0)
    # Constant images: SSIM reduces to the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    x, y = np.full((20, 20), 100, np.uint8), np.full((20, 20), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(x, y, scale=0) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    # Valid filtering of an 11x11 window: the map has (n - 10)^2 entries; a difference confined to
    # one corner pixel only lowers the windows that cover it.
    b = a.copy()
    b[-1, -1] = 255 - b[-1, -1]
    assert 0.9 < metrics.ssim(b, a, scale=0) < 1.0


def test_segmentation_metrics():
    t = np.zeros((4, 4), bool)
    t[:2] = True
    p = np.zeros((4, 4), bool)
    p[:1] = True
    assert metrics.dice(t, t) == 1.0
    assert metrics.dice(p, t) == pytest.approx(2 * 4 / (4 + 8))
    assert metrics.iou(p, t) == pytest.approx(4 / 8)
    assert metrics.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    prob = np.where(t, 0.9, 0.1)
    prob[3, 3] = 0.7
    assert metrics.pixel_accuracy(prob, t) == pytest.approx(15 / 16)
