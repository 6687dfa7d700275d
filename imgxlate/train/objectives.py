"""An objective owns the loss: ``loss, logs = objective(model, batch)``. Small losses combined per task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgxlate import losses


class SrObjective(nn.Module):
    """Pixel (l1 / mse) or perceptual (the lesson's FeatureLoss) loss between SR output and HR."""

    def __init__(self, loss: str = "l1", vgg_weights: str = "imagenet"):
        super().__init__()
        self.kind = loss
        self.feature_loss = losses.FeatureLoss(vgg_weights=vgg_weights) if loss == "perceptual" else None

    def forward(self, model, batch):
        lr, hr = batch
        sr = model(lr)
        if self.feature_loss is not None:
            terms = self.feature_loss(sr, hr, sum_layers=False)
            loss = sum(terms)
            return loss, {"loss": loss.item(), **{n: t.item() for n, t in zip(self.feature_loss.names, terms)}}
        loss = losses.l1(sr, hr) if self.kind == "l1" else losses.mse(sr, hr)
        return loss, {"loss": loss.item()}


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


class StyleObjective(nn.Module):
    """Content + per-layer Gram losses against one fixed style image (uint8 HxWx3), whose Gram targets
    are computed once at ``style_size`` (:func:`style_target`): training and ``eval style`` both build
    their loss here."""

    def __init__(self, style_image: np.ndarray, style_size: int | None, vgg_weights: str = "imagenet",
                 content_weight: float = 1e4, style_weights: tuple[float, ...] = (0.025, 0.275, 5.0, 0.2)):
        super().__init__()
        self.style_size = style_size
        self.loss = losses.StyleLoss(style_target(style_image, style_size), content_weight=content_weight,
                                     style_weights=style_weights, vgg_weights=vgg_weights)

    def forward(self, model, batch):
        (content,) = batch
        out = model(content)
        terms = self.loss(out, content, sum_layers=False)
        loss = sum(terms)
        return loss, {"loss": loss.item(), **{n: t.item() for n, t in zip(self.loss.names, terms)}}


SEG_LOSSES = {"bce": losses.bce, "bce_dice": losses.bce_dice}


class SegObjective(nn.Module):
    """BCE with logits (the lesson's loss) or BCE + soft Dice (the default)."""

    def __init__(self, loss: str = "bce_dice"):
        super().__init__()
        if loss not in SEG_LOSSES:
            raise ValueError(f"unknown segmentation loss {loss!r}; choose from {', '.join(SEG_LOSSES)}")
        self.kind = loss

    def forward(self, model, batch):
        img, mask = batch
        logits = model(img)
        loss = SEG_LOSSES[self.kind](logits, mask)
        return loss, {"loss": loss.item()}
