"""The lesson's SrResnet, grown into EDSR (Lim et al. 2017, arXiv:1707.02921).

    head conv 3->nf -> n ResBlocks (res_scale) -> conv -> [+ head, EDSR's long skip]
    -> log2(scale) x [conv nf->4nf (ICNR), PixelShuffle(2)] -> [BatchNorm, the lesson's] -> conv nf->3

Input and output are RGB in [0, 1]; the data mean is subtracted on the way in and added back on the
way out (EDSR's MeanShift), so the network learns a zero-centred residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from imgxlate.models.bicubic import Bicubic, BicubicConfig
from imgxlate.models.layers import PixelShuffleUp, ResBlock, conv, icnr_

SCALES = (1, 2, 4, 8)


@dataclass
class SrConfig:
    """SrResnet / EDSR. ``res_scale`` multiplies each residual branch before it is added. EDSR (Lim et
    al. 2017, sec. 3.2) uses 0.1 only for its large model (256 channels, 32 blocks), where wide layers
    made training unstable (after Szegedy et al. 2016); its baseline (64 channels, 16 blocks) uses no
    scaling (1.0), so the ``edsr-baseline`` preset does too. The lesson uses 0.1, so does the default,
    and so does every preset here whose width or depth is not the paper's baseline."""
    scale: int = 2
    nf: int = 64
    n_blocks: int = 8
    res_scale: float = 0.1            # the lesson's and EDSR's large model's; 1.0 for EDSR-baseline (see above)
    bn_before_last: bool = False      # the lesson's batch norm after the upsampler
    long_skip: bool = True            # EDSR's global residual over the body
    rgb_mean: tuple[float, float, float] = field(default=(0.4488, 0.4371, 0.4040))  # DIV2K, as EDSR
    # 'bicubic': add the bicubic upscale of the input to the output, so the network learns only the
    # residual (as VDSR, Kim et al. 2016); it starts at the bicubic baseline and trains faster.
    global_residual: str = "none"


PRESETS = {
    "lesson": SrConfig(nf=64, n_blocks=8, bn_before_last=True, long_skip=False),
    "edsr-baseline": SrConfig(nf=64, n_blocks=16, res_scale=1.0),   # the paper's baseline: no residual scaling
    "edsr": SrConfig(nf=256, n_blocks=32, res_scale=0.1),           # wide: scaled for stable training
    "tiny": SrConfig(nf=16, n_blocks=2, global_residual="bicubic"),
}


class SrResnet(nn.Module):
    arch = "sr"
    task = "sr"

    def __init__(self, config: SrConfig | None = None):
        super().__init__()
        c = self.config = config or SrConfig()
        if c.scale not in SCALES:
            raise ValueError(f"SR scale must be one of {SCALES}, got {c.scale}")
        self.scale = c.scale
        self.register_buffer("mean", torch.tensor(c.rgb_mean).view(1, 3, 1, 1), persistent=False)
        self.head = conv(3, c.nf)
        self.body = nn.Sequential(*[ResBlock(c.nf, c.res_scale) for _ in range(c.n_blocks)])
        self.body_conv = conv(c.nf, c.nf)
        self.upsample = nn.Sequential(*[PixelShuffleUp(c.nf) for _ in range(int(math.log2(c.scale)))])
        self.bn = nn.BatchNorm2d(c.nf) if c.bn_before_last else nn.Identity()
        self.tail = conv(c.nf, 3)
        if c.global_residual not in ("none", "bicubic"):
            raise ValueError(f"global_residual must be 'none' or 'bicubic', got {c.global_residual!r}")
        self.skip = None
        if c.global_residual == "bicubic":
            self.skip = Bicubic(BicubicConfig(scale=c.scale, matlab_uint8=False))
            with torch.no_grad():              # start close to the bicubic baseline, not at random colours
                self.tail.weight.mul_(0.01)
                self.tail.bias.zero_()

    def forward(self, x):                      # (B, 3, H, W) in [0, 1]
        h = self.head(x - self.mean)           # (B, nf, H, W)
        r = self.body_conv(self.body(h))
        if self.config.long_skip:
            r = r + h
        u = self.bn(self.upsample(r))          # (B, nf, sH, sW)
        y = self.tail(u)                       # (B, 3, sH, sW)
        return y + (self.skip(x) if self.skip is not None else self.mean)     # ~[0, 1]


def grow(model: SrResnet, scale: int) -> tuple[SrResnet, list[str]]:
    """The lesson's progressive-resizing step: a model for a larger scale that keeps every matching
    weight of ``model`` (loaded non-strictly) and ICNR-initialises the added upsampling convs.

    Returns the new model and the names of its parameters that are new.
    """
    if scale <= model.scale:
        raise ValueError(f"can only grow to a larger scale than x{model.scale}")
    bigger = SrResnet(replace(model.config, scale=scale)).to(next(model.parameters()).device)
    result = bigger.load_state_dict(model.state_dict(), strict=False)
    new = list(result.missing_keys)
    for name, module in bigger.upsample.named_children():
        if f"upsample.{name}.0.weight" in new:
            icnr_(module[0].weight, 2)
            nn.init.zeros_(module[0].bias)
    return bigger, [n for n, _ in bigger.named_parameters() if n in new]


def widen(model: SrResnet, nf: int, n_blocks: int, seed: int = 0) -> tuple[SrResnet, list[str]]:
    """A wider and/or deeper model that computes what ``model`` does, up to float rounding (a function-preserving
    growth, as Net2Net, Chen et al. 2016, arXiv:1511.05641), so a run starts where ``model`` is and training puts
    the new capacity to use. Every weight of ``model`` is kept in the first channels; the weights by which an old
    channel would read a new one are zero (so old channels compute what they did), the tail reads no new channel,
    and each added residual block (after the old ones) starts with its last conv at zero, as the identity. The
    new channels' own weights get the usual initialisation (seeded), so they differ from each other and learn.

    Returns the new model and the names of its parameters that are new or partly new.
    """
    c = model.config
    if nf < c.nf or n_blocks < c.n_blocks:
        raise ValueError(f"a model can only grow: it has {c.nf} channels and {c.n_blocks} blocks, asked for "
                         f"{nf} and {n_blocks}")
    with torch.random.fork_rng(devices=[]):                # the CPU generator only, put back after
        torch.default_generator.manual_seed(seed)
        bigger = SrResnet(replace(c, nf=nf, n_blocks=n_blocks))
    old, changed = model.state_dict(), []
    with torch.no_grad():
        for name, p in list(bigger.named_parameters()) + list(bigger.named_buffers()):
            if name not in old:                                  # an added block
                if name.endswith("body.2.weight") or name.endswith("body.2.bias"):
                    p.zero_()
                changed.append(name)
                continue
            o = old[name].to(p.dtype)
            if o.shape == p.shape:
                p.copy_(o)
                continue
            p[tuple(slice(0, n) for n in o.shape)] = o
            if p.dim() == 4 and p.shape[1] > o.shape[1]:         # old outputs read no new input
                p[:o.shape[0], o.shape[1]:] = 0
            changed.append(name)
    return bigger.to(next(model.parameters()).device), [n for n, _ in bigger.named_parameters() if n in changed]


def grow_to(model: SrResnet, overrides: dict, seed: int = 0) -> tuple[SrResnet, list[str]]:
    """``model`` made what ``overrides`` (``--model-config`` beside ``--init``) ask: wider and / or deeper, by
    widen(). Any other field that differs is a ValueError, since the trained weights fix it, as is an unknown
    one; ``scale`` is left to grow() (the stages')."""
    c, names = model.config, {f.name for f in fields(SrConfig)}
    if unknown := set(overrides) - names:
        raise ValueError(f"unknown sr config fields {sorted(unknown)}")
    if bad := [f"{k} {overrides[k]!r}" for k in ("nf", "n_blocks") if k in overrides and type(overrides[k]) is not int]:
        raise ValueError(f"{', '.join(bad)}: a whole number")
    want = replace(c, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if k != "scale"})
    if fixed := sorted(k for k in names - {"nf", "n_blocks", "scale"} if getattr(want, k) != getattr(c, k)):
        raise ValueError(f"{', '.join(f'{k} {getattr(want, k)!r}' for k in fixed)}: the trained model has "
                         f"{', '.join(f'{k} {getattr(c, k)!r}' for k in fixed)}, which its weights fix; only nf "
                         f"and n_blocks can grow")
    if (want.nf, want.n_blocks) == (c.nf, c.n_blocks):
        return model, []
    return widen(model, want.nf, want.n_blocks, seed)
