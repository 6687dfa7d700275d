"""An objective owns the loss: ``loss, logs = objective(model, batch)``. Small losses combined per task. ``logs``
holds detached tensors, not floats: reading a GPU tensor's value (``.item()``) waits for the device, so the loop
sums them where they are and reads them once per epoch."""

from __future__ import annotations

import numpy as np
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
            return loss, {"loss": loss.detach(), **{n: t.detach() for n, t in zip(self.feature_loss.names, terms)}}
        loss = losses.l1(sr, hr) if self.kind == "l1" else losses.mse(sr, hr)
        return loss, {"loss": loss.detach()}


class StyleObjective(nn.Module):
    """Content + per-layer Gram losses against one fixed style image (uint8 HxWx3), whose Gram targets
    are computed once at ``style_size``: :func:`imgxlate.losses.style_loss`, which ``eval style`` builds too."""

    def __init__(self, style_image: np.ndarray, style_size: int | None, vgg_weights: str = "imagenet",
                 content_weight: float = 1e4, style_weights: tuple[float, ...] = (0.025, 0.275, 5.0, 0.2)):
        super().__init__()
        self.style_size = style_size
        self.loss = losses.style_loss(style_image, style_size, vgg_weights, content_weight, style_weights)

    def forward(self, model, batch):
        (content,) = batch
        out = model(content)
        terms = self.loss(out, content, sum_layers=False)
        loss = sum(terms)
        return loss, {"loss": loss.detach(), **{n: t.detach() for n, t in zip(self.loss.names, terms)}}


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
        return loss, {"loss": loss.detach()}
