"""Run a model on decoded uint8 arrays: the one place where arrays become tensors and back."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imgxlate.models import REGISTRY, build, load


def resolve_model(spec: str, scale: float | None = None, device: str = "cpu") -> nn.Module:
    """A model from a registry name with no weights (``bicubic``) or an artifact path / URI."""
    if spec == "bicubic":
        return build("bicubic", scale=scale or 2).to(device).eval()
    if spec in REGISTRY:
        raise ValueError(f"model {spec!r} has trainable weights: pass the path or URI of a trained "
                         f"artifact (only 'bicubic' runs by name)")
    model = load(spec, device)
    if scale is not None and model.task == "sr" and model.scale != scale:
        raise ValueError(f"{spec} is a x{model.scale} model but --scale {scale:g} was asked for")
    return model


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8 -> (1, 3, H, W) float in [0, 1]; gray is repeated to 3 channels."""
    x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255)
    if x.ndim == 2:
        x = x[..., None]
    x = x.permute(2, 0, 1)[None]
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def to_uint8(y: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) float in [0, 1] -> HxWxC uint8, rounded (protocol step 3: quantise)."""
    return y[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.inference_mode()
def predict_array(model: nn.Module, img: np.ndarray) -> np.ndarray:
    """Model output for one uint8 image: an RGB image (sr/style) or per-class logits (seg)."""
    device = next(iter(model.buffers()), torch.empty(0)).device
    y = model(to_tensor(img).to(device))
    return to_uint8(y) if model.task in ("sr", "style") else y[0].float().cpu().numpy()
