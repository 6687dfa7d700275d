"""Degradations for restoration models, as deterministic functions of explicit parameters: what
restoration training applies to its LR crops and ``imgxlate eval sr --degradations`` to its LR images.

A :class:`DegradationSampler` draws the parameters from a seeded generator; :func:`apply` is pure.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Degradation:
    blur_sigma: float = 0.0          # Gaussian blur, in pixels
    noise_sigma: float = 0.0         # Gaussian noise, in 0..255 units
    noise_seed: int = 0
    jpeg_quality: int | None = None  # re-encode as JPEG at this quality
    grayscale: bool = False          # drop colour (for colourisation)


def apply(img: np.ndarray, d: Degradation) -> np.ndarray:
    """HxWx3 uint8 -> degraded HxWx3 uint8, in the order blur, grayscale, noise, JPEG."""
    im = Image.fromarray(img)
    if d.blur_sigma > 0:
        im = im.filter(ImageFilter.GaussianBlur(d.blur_sigma))
    if d.grayscale:
        im = im.convert("L").convert("RGB")
    out = np.asarray(im)
    if d.noise_sigma > 0:
        noise = np.random.default_rng(d.noise_seed).normal(0, d.noise_sigma, out.shape)
        if d.grayscale:
            noise = np.repeat(noise[..., :1], 3, axis=2)
        out = np.clip(np.round(out + noise), 0, 255).astype(np.uint8)
    if d.jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, "JPEG", quality=int(d.jpeg_quality))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


@dataclass
class DegradationSampler:
    """Each degradation applied with its probability, its strength drawn uniformly from a range."""
    p_blur: float = 0.0
    blur: tuple[float, float] = (0.5, 2.0)
    p_noise: float = 0.0
    noise: tuple[float, float] = (1.0, 15.0)
    p_jpeg: float = 0.0
    jpeg: tuple[int, int] = (20, 90)
    p_gray: float = 0.0

    def sample(self, rng: np.random.Generator) -> Degradation:
        u = rng.random(4)
        return Degradation(
            blur_sigma=float(rng.uniform(*self.blur)) if u[0] < self.p_blur else 0.0,
            noise_sigma=float(rng.uniform(*self.noise)) if u[1] < self.p_noise else 0.0,
            noise_seed=int(rng.integers(2**31)),
            jpeg_quality=int(rng.integers(self.jpeg[0], self.jpeg[1] + 1)) if u[2] < self.p_jpeg else None,
            grayscale=bool(u[3] < self.p_gray),
        )

    @property
    def active(self) -> bool:
        return any(p > 0 for p in (self.p_blur, self.p_noise, self.p_jpeg, self.p_gray))


PRESETS = {
    "none": DegradationSampler(),
    "restore": DegradationSampler(p_blur=0.3, p_noise=0.5, p_jpeg=0.7),
    "denoise": DegradationSampler(p_noise=1.0),
    "deblock": DegradationSampler(p_jpeg=1.0, jpeg=(10, 60)),
    "colourise": DegradationSampler(p_gray=1.0),
}
