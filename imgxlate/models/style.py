"""The lesson's StyleResnet: fast style transfer after Johnson et al. 2016 (arXiv:1603.08155).

    reflection pad 40 -> 9x9 conv 3->32 -> stride-2 convs 32->64->128 (H/4)
    -> 5 x CroppedResBlock(128) (unpadded convs, identity cropped by 2 px: -20 px at H/4)
    -> 2 x [nearest x2, conv] 128->64->32 -> 9x9 conv 32->3

The 40 px reflection padding is exactly eaten by the five unpadded residual blocks, so the output
has the input's size. Inputs whose sides are not multiples of 4 (or are smaller than the padding)
are padded and cropped back.
Every conv is conv -> ReLU -> norm as in the lesson; batch norm is the lesson's, instance norm
(Ulyanov et al. 2016) the option that usually looks better.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from imgxlate.models.layers import CroppedResBlock, NearestUp, conv, conv_act_norm, norm2d, pad_to_multiple


@dataclass
class StyleConfig:
    norm: str = "batch"               # 'batch' (the lesson) or 'instance'
    n_blocks: int = 5


class StyleResnet(nn.Module):
    arch = "style"
    task = "style"
    scale = 1

    def __init__(self, config: StyleConfig | None = None):
        super().__init__()
        c = self.config = config or StyleConfig()
        pad = 4 * c.n_blocks * 2               # each block loses 4 px at 1/4 resolution
        self.pad = nn.ReflectionPad2d(pad)
        self.down = nn.Sequential(
            conv_act_norm(3, 32, 9, norm=c.norm),
            conv_act_norm(32, 64, stride=2, norm=c.norm),
            conv_act_norm(64, 128, stride=2, norm=c.norm),
        )
        self.res = nn.Sequential(*[CroppedResBlock(128, c.norm) for _ in range(c.n_blocks)])
        self.up = nn.Sequential(NearestUp(128, 64, c.norm), NearestUp(64, 32, c.norm))
        # The lesson ends in conv -> BatchNorm (no activation); an output instance norm would erase
        # colour, so it is used with batch norm only.
        self.out = nn.Sequential(conv(32, 3, 9), norm2d("batch", 3) if c.norm == "batch" else nn.Identity())

    def forward(self, x):                      # (B, 3, H, W) in [0, 1]
        x, h, w = pad_to_multiple(x, 4, min_size=self.pad.padding[0] + 4)  # reflection needs pad < size
        y = self.pad(x)                        # (B, 3, H+80, W+80)
        y = self.down(y)                       # (B, 128, H/4+20, W/4+20)
        y = self.res(y)                        # (B, 128, H/4, W/4)
        y = self.out(self.up(y))               # (B, 3, H, W)
        return y[..., :h, :w]
