"""Read an image URI (local path or any fsspec URI) to a uint8 array, through the batch job's own
storage and codec: the readers training and evaluation share, so they accept every format the job does."""

from __future__ import annotations

import numpy as np

from imgxlate.io import codec, storage


def read_image(uri: str) -> np.ndarray:
    """uint8 HxW (grayscale files) or HxWx3 (alpha dropped); 16-bit reduced to 8 bits, rounded down."""
    d = codec.decode(storage.read_bytes(uri))
    px = d.pixels if d.bits == 8 else (d.pixels.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    return px


def read_rgb(uri: str) -> np.ndarray:
    """uint8 HxWx3 (gray repeated)."""
    px = read_image(uri)
    return np.repeat(px[..., None], 3, axis=2) if px.ndim == 2 else px


def read_mask(uri: str) -> np.ndarray:
    """uint8 HxW in {0, 1}: any non-zero label is foreground."""
    d = codec.decode(storage.read_bytes(uri))
    px = d.pixels if d.pixels.ndim == 2 else d.pixels[..., 0]
    return (px > 0).astype(np.uint8)
