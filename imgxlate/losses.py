"""Losses: small functions and modules that the training objectives combine per task.

    pixel        MSE / L1
    perceptual   the lesson's FeatureLoss: L1 between frozen VGG16-bn features + pixel L1 / 100
    style        content MSE at one block + Gram-matrix MSE per block (Johnson et al. 2016)
    segmentation BCE with logits, soft Dice, and their sum

All image inputs are RGB in [0, 1]; the VGG wrapper applies ImageNet normalisation itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_BN_Weights
from torchvision.models.vgg import cfgs, make_layers

from imgxlate import pretrained
from imgxlate.models.layers import IMAGENET_MEAN, IMAGENET_STD


def mse(input, target):
    return F.mse_loss(input.float(), target.float())       # fp32 under autocast: a bf16 loss rounds small errors


def l1(input, target):
    return F.l1_loss(input.float(), target.float())


# --------------------------------------------------------------------------------------------------
# VGG features
# --------------------------------------------------------------------------------------------------

def vgg16_bn_features(weights: str = "imagenet") -> nn.Sequential:
    """VGG16-bn's convolutional part. weights: 'imagenet' (torchvision), a path / URI of a vgg16_bn
    state_dict (whole model or features only), or 'random' for tests."""
    features = make_layers(cfgs["D"], batch_norm=True)
    if weights in pretrained.NO_WEIGHTS:
        return features
    if weights == "imagenet":
        state = pretrained.imagenet_state_dict(VGG16_BN_Weights.IMAGENET1K_V1, "vgg16_bn")
    else:
        state = pretrained.read_state_dict(weights)
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    features.load_state_dict(state)
    return features


def block_ends(features: nn.Sequential) -> list[int]:
    """Indices of the layers just before each max-pool: the last activation of each grid size."""
    return [i - 1 for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]


class VggFeatures(nn.Module):
    """Frozen VGG cut after the deepest requested layer; forward hooks save the requested outputs.
    Call :meth:`close` to remove the hooks."""

    def __init__(self, features: nn.Sequential, layer_ids: list[int]):
        super().__init__()
        self.net = features[: max(layer_ids) + 1].eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.layer_ids = list(layer_ids)
        self._saved: dict[int, torch.Tensor] = {}
        self._hooks = [self.net[i].register_forward_hook(self._saver(i)) for i in self.layer_ids]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _saver(self, i):
        def hook(module, inputs, output):
            self._saved[i] = output
        return hook

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()                        # frozen: batch norm statistics never move
        return self

    def forward(self, x) -> list[torch.Tensor]:   # (B, 3, H, W) in [0, 1] -> one map per layer id
        self._saved = {}
        self.net((x - self.mean) / self.std)
        return [self._saved.pop(i) for i in self.layer_ids]

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []


# --------------------------------------------------------------------------------------------------
# Perceptual (FeatureLoss)
# --------------------------------------------------------------------------------------------------

class FeatureLoss(nn.Module):
    """The lesson's perceptual loss: pixel L1 / 100 + sum_i w_i * L1(vgg_i(input), vgg_i(target)),
    at the ends of the first three VGG16-bn blocks with weights 0.2, 0.7, 0.1."""

    def __init__(self, features: nn.Sequential | None = None, n_blocks: int = 3,
                 layer_weights: tuple[float, ...] = (0.2, 0.7, 0.1), pixel_weight: float = 0.01,
                 vgg_weights: str = "imagenet"):
        super().__init__()
        features = features if features is not None else vgg16_bn_features(vgg_weights)
        ids = block_ends(features)[:n_blocks]
        if len(layer_weights) != len(ids):
            raise ValueError(f"{len(ids)} blocks but {len(layer_weights)} layer weights")
        self.vgg = VggFeatures(features, ids)
        self.layer_weights = tuple(layer_weights)
        self.pixel_weight = pixel_weight
        self.names = ["pixel"] + [f"feat_{i}" for i in ids]

    def forward(self, input, target, sum_layers: bool = True):
        with torch.no_grad():
            target_feats = self.vgg(target)
        input_feats = self.vgg(input)
        terms = [F.l1_loss(input, target) * self.pixel_weight]
        terms += [F.l1_loss(a, b) * w for a, b, w in zip(input_feats, target_feats, self.layer_weights)]
        return sum(terms) if sum_layers else terms

    def close(self):
        self.vgg.close()


# --------------------------------------------------------------------------------------------------
# Style
# --------------------------------------------------------------------------------------------------

def gram(x: torch.Tensor) -> torch.Tensor:
    """Per-sample Gram matrix (B, C, C) with batched matmul, divided by c*h*w. (The lesson's first
    version used a plain matmul and so mixed samples across the batch.)"""
    b, c, h, w = x.shape
    with torch.autocast(x.device.type, enabled=False):   # fp32 even under autocast: a sum over h*w products
        f = x.float().reshape(b, c, h * w)               # in bf16 (8 bits of mantissa) is noise at 1e6 scale
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


class StyleLoss(nn.Module):
    """The lesson's CombinedLoss: content MSE at one block * content_weight, plus per-block
    MSE between Gram matrices of the output and of the (fixed, never augmented) style image.

    Defaults are the lesson's: blocks 2..5 of VGG16-bn, content at the third of them, content weight
    1e4, style weights (0.025, 0.275, 5, 0.2), Gram matrices scaled by 1e6.
    """

    def __init__(self, style_image: torch.Tensor, features: nn.Sequential | None = None,
                 blocks: tuple[int, ...] = (1, 2, 3, 4), content_block: int = 2,
                 content_weight: float = 1e4, style_weights: tuple[float, ...] = (0.025, 0.275, 5.0, 0.2),
                 gram_scale: float = 1e6, vgg_weights: str = "imagenet"):
        super().__init__()
        features = features if features is not None else vgg16_bn_features(vgg_weights)
        ends = block_ends(features)
        ids = [ends[b] for b in blocks]
        if len(style_weights) != len(ids):
            raise ValueError(f"{len(ids)} blocks but {len(style_weights)} style weights")
        self.vgg = VggFeatures(features, ids)
        self.content_block = content_block
        self.content_weight = content_weight
        self.style_weights = tuple(style_weights)
        self.gram_scale = gram_scale
        self.names = ["content"] + [f"style_{i}" for i in ids]
        with torch.no_grad():                  # the style features are computed once
            grams = [gram(f) * gram_scale for f in self.vgg(style_image.to(self.vgg.mean.device))]
        for i, g in enumerate(grams):
            self.register_buffer(f"style_gram_{i}", g, persistent=False)

    def style_grams(self) -> list[torch.Tensor]:
        return [getattr(self, f"style_gram_{i}") for i in range(len(self.style_weights))]

    def forward(self, input, content, sum_layers: bool = True):
        with torch.no_grad():
            target = self.vgg(content)[self.content_block]
        feats = self.vgg(input)
        terms = [F.mse_loss(feats[self.content_block], target) * self.content_weight]
        for f, g, w in zip(feats, self.style_grams(), self.style_weights):
            gi = gram(f) * self.gram_scale
            terms.append(F.mse_loss(gi, g.expand_as(gi)) * w)
        return sum(terms) if sum_layers else terms

    def close(self):
        self.vgg.close()


def style_target(style: np.ndarray, size: int | None) -> torch.Tensor:
    """The style image the Gram targets are computed from, (1, 3, H, W) in [0, 1]: resized (bilinear,
    antialiased) so that its shorter side is ``size``, as the lesson resizes the painting to the training
    size first. Gram matrices describe the brush strokes at the scale VGG sees them, so a painting scanned
    at full resolution has strokes far finer than the training crops can learn. None: as it is."""
    t = torch.from_numpy(np.array(style[..., :3])).permute(2, 0, 1).float()[None] / 255
    h, w = t.shape[-2:]
    if size and size != min(h, w):
        k = size / min(h, w)
        t = F.interpolate(t, size=(max(1, round(h * k)), max(1, round(w * k))), mode="bilinear", antialias=True,
                          align_corners=False).clamp_(0, 1)
    return t


def style_size_of(config: dict) -> int | None:
    """The style size a run config says (a RunConfig as a dict, or the one recorded in an artifact's
    provenance): ``style_size``, by default the content size. A config from before the setting existed
    trained on the painting at full resolution: None."""
    if "style_size" not in config:
        return None
    return config["style_size"] or config.get("content_size", 256)


def style_loss(style_image: np.ndarray, style_size: int | None, vgg_weights: str = "imagenet",
               content_weight: float = 1e4, style_weights: tuple[float, ...] = (0.025, 0.275, 5.0, 0.2)
               ) -> StyleLoss:
    """The style objective's loss against one fixed style image (uint8 HxWx3), its Gram targets computed
    once at ``style_size`` (:func:`style_target`): training and ``eval style`` both build their loss here."""
    return StyleLoss(style_target(style_image, style_size), content_weight=content_weight,
                     style_weights=style_weights, vgg_weights=vgg_weights)


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------

def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def soft_dice_loss(logits, target, eps: float = 1.0):
    """1 - mean over samples of (2 sum(p t) + eps) / (sum p + sum t + eps), p = sigmoid(logits)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return 1 - dice.mean()


def bce_dice(logits, target):
    return bce(logits, target) + soft_dice_loss(logits, target)
