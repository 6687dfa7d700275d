"""U-Net on a torchvision ResNet34 encoder (the lesson's Unet34), and the lesson's non-U-Net baseline.

    encoder stages (H/2 .. H/32), outputs pushed on a skip list
    -> UnetBlock x4, each popping one skip (transposed conv up, 1x1 conv across, concat, ReLU, BN)
    -> transposed conv x2 to the input resolution -> (B, n_classes, H, W) logits

Skip channels are measured by running the encoder once on a small tensor, never written by hand.
Inputs are RGB in [0, 1], ImageNet-normalised inside; any size works (padded to a multiple of 32,
cropped back). n_classes = 1 gives binary logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imgxlate.models.layers import IMAGENET_MEAN, IMAGENET_STD, StdUpsample, UnetBlock, pad_to_multiple


@dataclass
class UnetConfig:
    n_classes: int = 1
    encoder_weights: str = "none"     # where the encoder's weights came from: 'none', 'imagenet' or a path / URI
                                      # (recorded; imgxlate.pretrained fetches them, the model gets a state_dict)
    decoder_width: int = 256          # channels out of every UnetBlock, as in the lesson


def resnet34_encoder(state: dict | None = None) -> nn.ModuleList:
    """ResNet34 cut before its pooling head, as 5 stages at strides 2, 4, 8, 16, 32; ``state``: a full
    resnet34 state_dict (e.g. ImageNet weights, see imgxlate.pretrained), or None for random init."""
    from torchvision.models import resnet34  # here, not at import: a model actor of an SR model never pays it

    rn = resnet34(weights=None)
    if state is not None:
        rn.load_state_dict(state)
    return nn.ModuleList([
        nn.Sequential(rn.conv1, rn.bn1, rn.relu),   # /2
        nn.Sequential(rn.maxpool, rn.layer1),       # /4
        rn.layer2,                                  # /8
        rn.layer3,                                  # /16
        rn.layer4,                                  # /32
    ])


@torch.no_grad()
def stage_channels(encoder: nn.ModuleList) -> list[int]:
    """Channels out of each stage, measured on a 64x64 probe (eval mode: BN stats untouched)."""
    was_training = encoder.training
    encoder.eval()
    x, chans = torch.zeros(1, 3, 64, 64), []
    for stage in encoder:
        x = stage(x)
        chans.append(x.shape[1])
    encoder.train(was_training)
    return chans


class _EncoderNet(nn.Module):
    task = "seg"
    scale = 1
    multiple = 32

    def __init__(self, config: UnetConfig | None, encoder_state: dict | None):
        super().__init__()
        self.config = config or UnetConfig()
        self.encoder = resnet34_encoder(encoder_state)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def encoder_groups(self) -> list[nn.Module]:
        """Layer groups for discriminative learning rates / freezing: encoder, then the rest."""
        return [self.encoder, nn.ModuleList([m for n, m in self.named_children() if n != "encoder"])]

    def _prepare(self, x):
        return pad_to_multiple((x - self.mean) / self.std, self.multiple)


class Unet(_EncoderNet):
    arch = "unet"

    def __init__(self, config: UnetConfig | None = None, encoder_state: dict | None = None):
        super().__init__(config, encoder_state)
        chans = stage_channels(self.encoder)         # e.g. [64, 64, 128, 256, 512]
        width = self.config.decoder_width
        ups, up_in = [], chans[-1]
        for skip_ch in reversed(chans[:-1]):
            ups.append(UnetBlock(up_in, skip_ch, width))
            up_in = width
        self.up = nn.ModuleList(ups)
        self.final = nn.ConvTranspose2d(width, self.config.n_classes, 2, stride=2)

    def forward(self, x):                      # (B, 3, H, W) in [0, 1]
        x, h, w = self._prepare(x)
        skips = []
        for stage in self.encoder[:-1]:
            x = stage(x)
            skips.append(x)                    # /2, /4, /8, /16
        x = F.relu(self.encoder[-1](x))        # (B, 512, H/32, W/32)
        for block in self.up:
            x = block(x, skips.pop())          # -> /16, /8, /4, /2
        x = self.final(x)                      # (B, n_classes, H, W)
        return x[..., :h, :w]


class UpsampleHead(_EncoderNet):
    """The lesson's baseline: the same encoder, then transposed-conv upsamples with no skips."""

    arch = "upsample_head"

    def __init__(self, config: UnetConfig | None = None, encoder_state: dict | None = None):
        super().__init__(config, encoder_state)
        chans = stage_channels(self.encoder)
        width = self.config.decoder_width
        n_up = len(self.encoder) - 1
        self.head = nn.Sequential(
            nn.ReLU(),
            *[StdUpsample(chans[-1] if i == 0 else width, width) for i in range(n_up)],
            nn.ConvTranspose2d(width, self.config.n_classes, 2, stride=2),
        )

    def forward(self, x):
        x, h, w = self._prepare(x)
        for stage in self.encoder:
            x = stage(x)                       # -> (B, 512, H/32, W/32)
        return self.head(x)[..., :h, :w]       # (B, n_classes, H, W)
