"""Bicubic: zero parameters, any scale. The baseline every model is measured against, and the test
double that drives the pipelines.

It applies the same MATLAB-compatible kernel as :func:`imgxlate.metrics.imresize` (float, no
intermediate rounding), so its quantised output lands on the published bicubic rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from imgxlate.metrics import output_size, resize_matrix, resize_taps


@dataclass
class BicubicConfig:
    scale: float = 2
    # MATLAB resizes uint8 images in two 1-D passes and rounds (half away from zero) to uint8 after
    # each; doing the same on the 0..255 grid makes the output equal imgxlate.metrics.imresize on
    # 8-bit inputs bit for bit. False gives plain float bicubic.
    matlab_uint8: bool = True


# Up to this many entries (in x out) an axis is resized by one product with its dense resize matrix: on small
# images several times faster than gathering the taps (1.8x at 1536 px), and the same sums as
# imgxlate.metrics.imresize does. Larger axes gather their few taps instead (memory by the output only).
DENSE_MAX = 1 << 22
CACHED_MAX = 1 << 16     # matrices up to this many entries (512 KB) are kept, 128 of them at most (64 MB)


@lru_cache(maxsize=128)
def _cached(in_len: int, out_len: int, scale: float) -> torch.Tensor:
    return torch.from_numpy(resize_matrix(in_len, out_len, scale))     # shared: never written


def _dense(in_len: int, out_len: int, scale: float) -> torch.Tensor:
    if in_len * out_len <= CACHED_MAX:
        return _cached(in_len, out_len, scale)
    return torch.from_numpy(resize_matrix(in_len, out_len, scale))


@torch.compiler.disable     # runs eagerly inside a compiled model: dynamo cannot guard on the cached from_numpy
def _resize_axis(x: torch.Tensor, dim: int, scale: float) -> torch.Tensor:  # matrices, and this is a matmul anyway
    n = x.shape[dim]
    out = output_size(n, scale)
    if n * out <= DENSE_MAX and dim >= x.dim() - 2:
        m = _dense(n, out, scale).to(dtype=x.dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):   # in x's precision, as the taps are: never bf16
            return torch.matmul(m, x) if dim == x.dim() - 2 else torch.matmul(x, m.T)
    w, idx = resize_taps(n, out, scale)                             # (out, P) each
    w = torch.as_tensor(w, dtype=x.dtype, device=x.device)
    idx = torch.as_tensor(idx, device=x.device)
    taps = x.index_select(dim, idx.reshape(-1))                     # out*P samples along dim
    shape = list(x.shape)
    shape[dim:dim + 1] = list(idx.shape)
    view = [1] * len(shape)
    view[dim:dim + 2] = list(w.shape)
    return (taps.reshape(shape) * w.reshape(view)).sum(dim + 1)


class Bicubic(nn.Module):
    arch = "bicubic"
    task = "sr"

    def __init__(self, config: BicubicConfig | None = None):
        super().__init__()
        self.config = config or BicubicConfig()
        self.scale = self.config.scale

    def forward(self, x):                      # (B, C, H, W) -> (B, C, ceil(sH), ceil(sW)), same range
        if not self.config.matlab_uint8:
            return _resize_axis(_resize_axis(x, 2, self.scale), 3, self.scale)
        dtype = x.dtype
        # In 0..255 units and float64 the x2/x4 weights are exact dyadic fractions, so .5 ties are
        # exact ties and are rounded away from zero, as MATLAB does.
        v = (x.double() if x.device.type == "cpu" else x.float()).mul(255).round()
        v = _resize_axis(v, 2, self.scale).add(0.5).floor().clamp(0, 255)   # rows first
        v = _resize_axis(v, 3, self.scale).add(0.5).floor().clamp(0, 255)
        return v.div(255).to(dtype)
