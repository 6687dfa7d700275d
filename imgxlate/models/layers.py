"""One vocabulary of blocks shared by every model family (SR, style, U-Net)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet channel statistics (RGB in [0, 1]) that torchvision's pretrained encoders expect: the U-Net
# encoder and the perceptual loss's VGG both normalise with them, so they live here where both may import.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv(ni: int, nf: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
         bias: bool = True) -> nn.Conv2d:
    """Plain conv; 'same' padding (kernel_size // 2) unless told otherwise."""
    pad = kernel_size // 2 if padding is None else padding
    return nn.Conv2d(ni, nf, kernel_size, stride=stride, padding=pad, bias=bias)


def norm2d(kind: str, nf: int) -> nn.Module:
    """'batch' (the lesson), 'instance' (Ulyanov et al. 2016, affine) or 'none'."""
    if kind == "batch":
        return nn.BatchNorm2d(nf)
    if kind == "instance":
        return nn.InstanceNorm2d(nf, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use 'batch', 'instance' or 'none'")


def conv_act_norm(ni: int, nf: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                  act: bool = True, norm: str = "batch") -> nn.Sequential:
    """The lesson's style-net conv: conv -> ReLU -> norm (bias dropped when a norm follows)."""
    layers: list[nn.Module] = [conv(ni, nf, kernel_size, stride, padding, bias=norm == "none")]
    if act:
        layers.append(nn.ReLU(inplace=True))
    layers.append(norm2d(norm, nf))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale * conv(relu(conv(x))), no batch norm.

    res_scale 0.1 (Lim et al. 2017, after Szegedy et al. 2016) keeps the early activations of wide,
    deep or large-batch models from blowing up.
    """

    def __init__(self, nf: int, res_scale: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(conv(nf, nf), nn.ReLU(inplace=True), conv(nf, nf))
        self.res_scale = res_scale

    def forward(self, x):
        return x + self.body(x) * self.res_scale


class CroppedResBlock(nn.Module):
    """The lesson's style-net block (``ResSequentialCenter``): two unpadded 3x3 convs lose 2 px per
    side, so the identity path is centre-cropped by 2 px to match."""

    def __init__(self, nf: int, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(conv_act_norm(nf, nf, padding=0, norm=norm),
                                  conv_act_norm(nf, nf, padding=0, act=False, norm=norm))

    def forward(self, x):                      # (B, C, H, W) -> (B, C, H-4, W-4)
        return x[:, :, 2:-2, 2:-2] + self.body(x)


@torch.no_grad()
def icnr_(weight: torch.Tensor, scale: int = 2, init=nn.init.kaiming_normal_) -> torch.Tensor:
    """ICNR init (Aitken et al. 2017) for a conv that feeds PixelShuffle(scale), in place.

    One sub-kernel per output channel is drawn and repeated scale**2 times, so right after init
    every (scale x scale) block of the shuffled output is constant: no checkerboard to unlearn.
    """
    nf_out, ni = weight.shape[:2]
    r2 = scale * scale
    if nf_out % r2:
        raise ValueError(f"{nf_out} output channels are not a multiple of scale**2 = {r2}")
    sub = init(torch.empty(nf_out // r2, ni, *weight.shape[2:], dtype=weight.dtype, device=weight.device))
    weight.copy_(sub.repeat_interleave(r2, dim=0))  # PixelShuffle reads channel c*r2 + k
    return weight


class PixelShuffleUp(nn.Sequential):
    """One x2 stage: conv nf -> 4nf (ICNR-initialised, zero bias), PixelShuffle(2)."""

    def __init__(self, nf: int):
        super().__init__(conv(nf, nf * 4), nn.PixelShuffle(2))
        icnr_(self[0].weight, 2)
        nn.init.zeros_(self[0].bias)


class NearestUp(nn.Sequential):
    """The lesson's style-net upsampler: nearest x2, then conv -> ReLU -> norm."""

    def __init__(self, ni: int, nf: int, norm: str = "batch"):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), conv_act_norm(ni, nf, norm=norm))


class UnetBlock(nn.Module):
    """The lesson's UnetBlock: transposed conv on the up path, 1x1 conv on the cross path, each to
    n_out/2 channels; concat, ReLU, batch norm."""

    def __init__(self, up_in: int, x_in: int, n_out: int):
        super().__init__()
        half = n_out // 2
        self.tr_conv = nn.ConvTranspose2d(up_in, half, 2, stride=2)
        self.x_conv = nn.Conv2d(x_in, n_out - half, 1)
        self.bn = nn.BatchNorm2d(n_out)

    def forward(self, up, skip):
        up = self.tr_conv(up)                  # (B, up_in, h, w) -> (B, n/2, 2h, 2w)
        skip = self.x_conv(skip)               # (B, x_in, 2h, 2w) -> (B, n/2, 2h, 2w)
        return self.bn(F.relu(torch.cat([up, skip], dim=1)))


class StdUpsample(nn.Module):
    """The lesson's non-U-Net upsample: transposed conv x2, ReLU, batch norm."""

    def __init__(self, ni: int, nf: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(ni, nf, 2, stride=2)
        self.bn = nn.BatchNorm2d(nf)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate",
                    min_size: int = 0) -> tuple[torch.Tensor, int, int]:
    """Pad H and W at the bottom/right to a multiple (and at least min_size); returns the padded
    tensor and the original size, for cropping back."""
    h, w = x.shape[-2:]
    ph = max(min_size - h, 0) + (-max(h, min_size)) % multiple
    pw = max(min_size - w, 0) + (-max(w, min_size)) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w
