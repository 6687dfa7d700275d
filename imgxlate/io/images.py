"""Read an image URI (local path or any fsspec URI) to a uint8 array, or its size from the header,
through the batch job's own storage and codec: the readers training and evaluation share, so they accept
every format the job does."""

from __future__ import annotations

import struct

import numpy as np
from PIL import UnidentifiedImageError

from imgxlate.io import codec, listing, storage

_SIZES: dict[str, tuple[int, int]] = {}


def read_image(uri: str) -> np.ndarray:
    """uint8 HxW (grayscale files) or HxWx3 (alpha dropped); 16-bit reduced to 8 bits as the encoder does
    (:func:`imgxlate.io.codec.to_8bit`, rounded to nearest)."""
    return codec.to_8bit(codec.decode(storage.read_bytes(uri)).pixels)


def read_rgb(uri: str) -> np.ndarray:
    """uint8 HxWx3 (gray repeated)."""
    px = read_image(uri)
    return np.repeat(px[..., None], 3, axis=2) if px.ndim == 2 else px


def read_mask(uri: str) -> np.ndarray:
    """uint8 HxW in {0, 1}: any non-zero label is foreground."""
    d = codec.decode(storage.read_bytes(uri))
    px = d.pixels if d.pixels.ndim == 2 else d.pixels[..., 0]
    return (px > 0).astype(np.uint8)


def image_size(uri: str) -> tuple[int, int]:
    """(height, width) as :func:`read_image` would give them (EXIF orientation applied), from the file's
    header only (read through storage in 64 KB blocks: a header usually costs one); remembered per
    process, so later stages ask again for free."""
    if uri not in _SIZES:
        def probe():
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb", block_size=1 << 16) as f:
                return codec.header_size(f)
        try:
            _SIZES[uri] = storage.retry(probe)
        except (UnidentifiedImageError, SyntaxError, EOFError, struct.error) as e:     # the file, not the store
            raise codec.DecodeError(f"{listing.redact(uri)}: not an image, or its header is damaged: {e}") from e
        except Exception as e:
            raise ValueError(f"{listing.redact(uri)}: cannot read the image's header: {e}") from e
    return _SIZES[uri]


def shorter_sides(uris: list[str]) -> tuple[dict[str, int], list[str]]:
    """({uri: the shorter side} of the images whose header can be read, [why, for each that is not an image]):
    from :func:`image_size`, so that one file that is not an image leaves out itself, not a whole training run.
    An error of the store (after retries) is raised: every worker must make the same plan."""
    sides, bad = {}, []
    for u in uris:
        try:
            sides[u] = min(image_size(u))
        except codec.DecodeError as e:       # not an image, empty, cut short before its size
            bad.append(str(e))
    return sides, bad
