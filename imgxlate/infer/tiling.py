"""Tiled inference with overlap and feathered blending.

The image is cut into tiles of ``tile`` input pixels overlapping by ``overlap``; each tile's output
is weighted by a ramp that ignores the outer quarter of the overlap (pixels that saw zero padding
instead of their neighbours) and blends over its middle half. Rows of tiles are finalised as soon
as no later row touches them, so float memory is bounded by one row of tiles, whatever the image
size; only the finished (quantised) output is kept whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def layout(n: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, start positions) covering [0, n): as few tiles of at most ``tile`` as overlap
    allows, shrunk to share the length evenly so that no tile is mostly overlap."""
    if n <= tile:
        return n, [0]
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    k = math.ceil((n - overlap) / (tile - overlap))
    size = math.ceil((n + (k - 1) * overlap) / k)
    return size, [round(i * (n - size) / (k - 1)) for i in range(k)]


def ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Blend weights along one axis of a tile output of length n (overlap in output pixels)."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        i = np.arange(n, dtype=np.float32) + 0.5
        rise = np.clip((i - overlap / 4) / (overlap / 2), 1e-3, 1.0)
        if not at_start:
            w = np.minimum(w, rise)
        if not at_end:
            w = np.minimum(w, rise[::-1])
    return w


class Halted(BaseException):
    """Raised between rows of tiles (and by the Predictor between model calls) once ``halt()`` says so (a second
    Ctrl-C while the model runs in a thread of the driver's process): not an Exception, so that no stage turns it
    into an input's failure row."""


def run_tiled(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: float,
              tile: int | tuple[int, int], overlap: int, finalize: Callable[[np.ndarray], np.ndarray],
              max_batch: int = 4, halt: Callable[[], bool] | None = None) -> np.ndarray:
    """``finalize(forward(x))`` computed tile by tile.

    x: (1, C, H, W), any dtype (integer pixels stay integer until forward gets a tile). tile: the
    side, or (height, width). forward maps (B, C, h, w) -> (B, C', s*h, s*w). finalize maps a float
    (rows, W', C') band of the blended output to its final dtype (e.g. quantised uint8). ``halt``: asked
    before each row of tiles; :class:`Halted` when it says so.
    """
    _, _, h, w = x.shape
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    th, ys = layout(h, tile_h, overlap)
    tw, xs = layout(w, tile_w, overlap)
    s = scale
    oth, otw, ow, oov = round(th * s), round(tw * s), round(w * s), round(overlap * s)
    wx = [ramp(otw, oov, x0 == 0, x0 + tw >= w) for x0 in xs]
    out_parts: list[np.ndarray] = []
    acc = wsum = None
    acc_top = 0                                 # output row of acc[0]
    for y0 in ys:
        if halt is not None and halt():
            raise Halted("stopped at once, between rows of tiles")
        tiles = torch.cat([x[..., y0:y0 + th, x0:x0 + tw] for x0 in xs])        # (n, C, th, tw)
        outs = torch.cat([forward(tiles[i:i + max_batch]) for i in range(0, len(xs), max_batch)])
        outs = outs.float().permute(0, 2, 3, 1).cpu().numpy()                  # (n, oth, otw, C')
        top = round(y0 * s)
        if acc is None:
            acc = np.zeros((oth, ow, outs.shape[-1]), np.float32)
            wsum = np.zeros((oth, ow, 1), np.float32)
        else:                                   # rows above `top` are final: no later tile reaches them
            done = top - acc_top
            out_parts.append(finalize(acc[:done] / wsum[:done]))
            keep = acc.shape[0] - done
            acc = np.concatenate([acc[done:], np.zeros((oth - keep, ow, acc.shape[2]), np.float32)])
            wsum = np.concatenate([wsum[done:], np.zeros((oth - keep, ow, 1), np.float32)])
            acc_top = top
        wy = ramp(oth, oov, y0 == 0, y0 + th >= h)
        for i, x0 in enumerate(xs):
            wt = (wy[:, None] * wx[i][None, :])[..., None]                     # (oth, otw, 1)
            left = round(x0 * s)
            acc[:, left:left + otw] += outs[i] * wt
            wsum[:, left:left + otw] += wt
    out_parts.append(finalize(acc / wsum))
    return np.concatenate(out_parts)
