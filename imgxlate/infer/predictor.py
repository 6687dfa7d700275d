"""Run a model on decoded arrays: the one place where arrays become tensors and back.

:class:`Predictor` loads a model once (a Ray Data actor holds one) and maps decoded images
(uint8 / uint16, gray or RGB, optional alpha) to outputs of the same kind: small images are
batched, large ones go through tiled inference so memory is bounded by the tile.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgxlate.infer.tiling import run_tiled
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
    """HxW or HxWxC uint8/uint16 -> (1, 3, H, W) float in [0, 1]; gray is repeated to 3 channels."""
    peak = 65535.0 if img.dtype == np.uint16 else 255.0
    x = torch.from_numpy(np.ascontiguousarray(img).astype(np.float32)).div_(peak)
    if x.ndim == 2:
        x = x[..., None]
    x = x.permute(2, 0, 1)[None]
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def to_uint8(y: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) float in [0, 1] -> HxWxC uint8, rounded (protocol step 3: quantise)."""
    return y[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def model_device(model: nn.Module) -> torch.device:
    """Where the model lives (every model has a buffer, e.g. the data mean; CPU when it has none)."""
    return next(iter(model.buffers()), torch.empty(0)).device


@torch.inference_mode()
def predict_array(model: nn.Module, img: np.ndarray) -> np.ndarray:
    """Model output for one uint8 image, untiled: RGB uint8 (sr/style) or float logits (seg)."""
    device = model_device(model)
    y = model(to_tensor(img).to(device))
    return to_uint8(y) if model.task in ("sr", "style") else y[0].float().cpu().numpy()


@dataclass
class PredictOptions:
    tile: int | None = None            # input pixels per tile side; larger images are tiled (None: auto)
    overlap: int = 32                  # input pixels shared by neighbouring tiles
    amp: str = "bf16"                  # autocast on GPU: 'bf16', 'fp16' or 'off'
    batch_pixels: int | None = None    # small images of one size are batched up to this many pixels
    cutout: bool = False               # segmentation: write the RGBA cut-out instead of the mask


# Measured on 2 CPU cores: a conv net runs 1.5-2x faster per pixel on 256 px tiles than on whole
# multi-megapixel images (the activations stay in cache), and batching small images does not help.
# A GPU wants large tiles and batches.
AUTO = {"cpu": {"tile": 256, "batch_pixels": 256 * 256}, "cuda": {"tile": 1024, "batch_pixels": 4 * 1024 * 1024}}


@dataclass
class Output:
    pixels: np.ndarray                 # HxW or HxWx3, uint8 or uint16
    alpha: np.ndarray | None


class Predictor:
    """One model on one device; call :meth:`run` with decoded images."""

    def __init__(self, model: str | nn.Module, scale: float | None = None, device: str | None = None,
                 options: PredictOptions | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = resolve_model(model, scale, self.device) if isinstance(model, str) else model
        self.model.to(self.device).eval()
        self.task, self.scale = self.model.task, self.model.scale
        o = options or PredictOptions()
        auto = AUTO["cuda" if self.device.startswith("cuda") else "cpu"]
        self.options = PredictOptions(**{**o.__dict__, "tile": o.tile or auto["tile"],
                                         "batch_pixels": o.batch_pixels or auto["batch_pixels"]})
        self.alpha_resize = build("bicubic", scale=self.scale, matlab_uint8=False).to(self.device)

    def _autocast(self):
        amp = self.options.amp
        if self.device.startswith("cuda") and amp in ("bf16", "fp16"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        return contextlib.nullcontext()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(x.to(self.device, non_blocking=True)).float()

    def _finalizer(self, like: np.ndarray):
        """float (rows, W, C') band -> final array of the output's kind."""
        if self.task == "seg":
            def seg(band):
                if band.shape[-1] == 1:
                    return np.where(band[..., 0] > 0, 255, 0).astype(np.uint8)    # sigmoid > 0.5
                return band.argmax(-1).astype(np.uint8)
            return seg
        peak, dtype, gray = (65535.0, np.uint16, like.ndim == 2) if like.dtype == np.uint16 else (255.0, np.uint8,
                                                                                                   like.ndim == 2)

        def image(band):
            band = band.mean(-1) if gray else band
            return np.clip(np.round(band * peak), 0, peak).astype(dtype)
        return image

    @torch.inference_mode()
    def _infer(self, forward, x: torch.Tensor, scale: float, like: np.ndarray, finalize=None) -> np.ndarray:
        o = self.options
        return run_tiled(forward, x, scale, o.tile, o.overlap, finalize or self._finalizer(like),
                         max_batch=max(1, o.batch_pixels // (o.tile * o.tile)))

    def _alpha(self, alpha: np.ndarray | None) -> np.ndarray | None:
        """Alpha is resized on its own (bicubic) and put back, so transparency survives."""
        if alpha is None or self.task != "sr" or self.scale == 1:
            return alpha
        peak = 65535.0 if alpha.dtype == np.uint16 else 255.0
        a = torch.from_numpy(alpha.astype(np.float32) / peak)[None, None]

        def finalize(band):
            return np.clip(np.round(band[..., 0] * peak), 0, peak).astype(alpha.dtype)
        return self._infer(lambda t: self.alpha_resize(t.to(self.device)), a, self.scale, alpha, finalize)

    def _complete(self, pixels, alpha, out: np.ndarray) -> Output:
        if self.task != "seg":
            return Output(out, self._alpha(alpha))
        if not self.options.cutout:
            return Output(out, None)
        mask = out if pixels.dtype == np.uint8 else out.astype(np.uint16) * 257
        return Output(pixels, mask if alpha is None else np.minimum(alpha, mask))

    def run(self, images: list[tuple[np.ndarray, np.ndarray | None]]) -> list[Output | Exception]:
        """Outputs (or the exception that image raised) for decoded (pixels, alpha) pairs."""
        results: list[Output | Exception | None] = [None] * len(images)
        tile = self.options.tile
        groups: dict[tuple, list[int]] = {}
        for i, (px, _) in enumerate(images):
            h, w = px.shape[:2]
            if h <= tile and w <= tile:
                groups.setdefault((h, w, px.dtype.str, px.ndim), []).append(i)
            else:
                groups[("single", i)] = [i]
        for idx in groups.values():
            h, w = images[idx[0]][0].shape[:2]
            per_batch = max(1, self.options.batch_pixels // (h * w))
            for j in range(0, len(idx), per_batch):
                chunk = idx[j:j + per_batch]
                try:
                    self._run_chunk(images, chunk, results)
                except Exception as e:
                    if len(chunk) == 1:
                        results[chunk[0]] = e
                        continue
                    for i in chunk:            # isolate the failing image
                        try:
                            self._run_chunk(images, [i], results)
                        except Exception as e1:
                            results[i] = e1
        return results

    def _quantize(self, y: torch.Tensor, like: np.ndarray) -> np.ndarray:
        """(B, C', H, W) model output -> (B, H, W[, C]) final arrays, computed in torch."""
        if self.task == "seg":
            y = (y[:, 0] > 0).to(torch.uint8) * 255 if y.shape[1] == 1 else y.argmax(1).to(torch.uint8)
            return y.cpu().numpy()
        peak = 65535.0 if like.dtype == np.uint16 else 255.0
        if like.ndim == 2:
            y = y.mean(1, keepdim=True)
        q = y.clamp(0, 1).mul(peak).round().permute(0, 2, 3, 1)
        q = q.to(torch.int32).cpu().numpy().astype(like.dtype) if peak > 255 else q.to(torch.uint8).cpu().numpy()
        return q[..., 0] if like.ndim == 2 else q

    @torch.inference_mode()
    def _run_chunk(self, images, chunk: list[int], results: list) -> None:
        px0 = images[chunk[0]][0]
        if len(chunk) == 1 and max(px0.shape[:2]) > self.options.tile:
            out = self._infer(self._forward, to_tensor(px0), self.scale, px0)
            results[chunk[0]] = self._complete(px0, images[chunk[0]][1], out)
            return
        x = torch.cat([to_tensor(images[i][0]) for i in chunk])                   # (B, 3, h, w)
        y = self._quantize(self._forward(x), px0)                                  # (B, sh, sw[, 3])
        for k, i in enumerate(chunk):
            px, alpha = images[i]
            results[i] = self._complete(px, alpha, y[k])
