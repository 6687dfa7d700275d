"""Run a model on decoded arrays: the one place where arrays become model inputs and outputs.

:class:`Predictor` loads a model once (a Ray Data actor holds one) and maps decoded images
(uint8 / uint16, gray or RGB, optional alpha) to outputs, following the model's inference contract
(:mod:`imgxlate.infer.contract`): training validation, ``imgxlate eval`` and the batch job all call it,
so a model is run one way only. Native-geometry models (SR, style) batch small images of one size and
tile large ones; resize-geometry models (segmentation) see every image squashed to their training size,
or windows of it at the training scale, and their logits come back at the source resolution. Inputs stay
integer until a tile or a batch is cut from them, so float memory is bounded by the tile.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgxlate.artifact import load
from imgxlate.augment import N_DIHEDRAL, dihedral, dihedral_inverse
from imgxlate.infer.contract import Contract, from_meta
from imgxlate.infer.tiling import run_tiled
from imgxlate.models import REGISTRY, build


def resolve_model(spec: str, scale: float | None = None, device: str = "cpu") -> nn.Module:
    """A model from a name (``bicubic``, or a model shipped with imgxlate: ``sr-x2``, ...), an artifact
    folder path / URI, or a third-party ``.pth`` / ``.ckpt`` / ``.safetensors`` file (spandrel)."""
    from imgxlate import external, zoo

    if spec == "bicubic":
        return build("bicubic", scale=scale or 2).to(device).eval()
    if spec in REGISTRY:
        raise ValueError(f"model {spec!r} has trainable weights: pass the path or URI of a trained "
                         f"artifact, or a shipped model ({', '.join(zoo.names()) or 'none installed'})")
    if zoo.is_shipped(spec):
        spec = zoo.path(spec)
    model = external.load(spec, device) if external.is_external(spec) else load(spec, device)
    if scale is not None and model.task == "sr" and model.scale != scale:
        raise ValueError(f"{spec} is a x{model.scale:g} model but --scale {scale:g} was asked for")
    return model


def model_meta(spec: str) -> dict:
    """The metadata (config.json) of the model a spec names: artifact, shipped name or third-party file."""
    from imgxlate import external, zoo
    from imgxlate.artifact import read_meta

    if zoo.is_shipped(spec):
        spec = zoo.path(spec)
    return external.describe(spec)[1] if external.is_external(spec) else read_meta(spec)


def as_tensor(img: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8/uint16 -> (1, 3, H, W) integer view of the same memory (gray repeated, no copy)."""
    with warnings.catch_warnings():            # read-only arrays (from Arrow buffers) are never written to
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(img))
    x = (x[..., None] if x.ndim == 2 else x[..., :3]).permute(2, 0, 1)[None]
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Integer pixels -> float in [0, 1] (protocol: RGB in [0, 1] in)."""
    if x.is_floating_point():
        return x
    return x.float().div_(65535.0 if x.dtype == torch.uint16 else 255.0)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8/uint16 -> (1, 3, H, W) float in [0, 1]; gray is repeated to 3 channels."""
    return to_float(as_tensor(img))


def to_uint8(y: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) float in [0, 1] -> HxWxC uint8, rounded (protocol step 3: quantise)."""
    return y[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def model_device(model: nn.Module) -> torch.device:
    """Where the model lives (every model has a buffer, e.g. the data mean; CPU when it has none)."""
    return next(iter(model.buffers()), torch.empty(0)).device


def squash(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, C, H, W) float resized to (h, w): bilinear, antialiased (training's Resize on tensors)."""
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


@dataclass
class PredictOptions:
    tile: int | None = None            # input pixels per tile side; larger images are tiled (None: auto)
    overlap: int = 32                  # input pixels shared by neighbouring tiles
    amp: str = "bf16"                  # autocast on GPU: 'bf16', 'fp16' or 'off'
    batch_pixels: int | None = None    # small images of one size are batched up to this many pixels
    cutout: bool = False               # segmentation: write the RGBA cut-out instead of the mask
    ensemble: bool = False             # EDSR's 8-way geometric self-ensemble (sr / style)


# Measured on 2 CPU cores: a conv net runs 1.5-2x faster per pixel on 256 px tiles than on whole
# multi-megapixel images (the activations stay in cache), and batching small images does not help.
# A GPU wants large tiles and batches.
AUTO = {"cpu": {"tile": 256, "batch_pixels": 256 * 256}, "cuda": {"tile": 1024, "batch_pixels": 4 * 1024 * 1024}}


@dataclass
class Output:
    pixels: np.ndarray                 # HxW or HxWx3, uint8 or uint16
    alpha: np.ndarray | None


class Predictor:
    """One model on one device, run as its contract says; call :meth:`run` with decoded images."""

    def __init__(self, model: str | nn.Module, scale: float | None = None, device: str | None = None,
                 options: PredictOptions | None = None, contract: Contract | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = resolve_model(model, scale, self.device) if isinstance(model, str) else model
        self.model.to(self.device).eval()
        self.task, self.scale = self.model.task, self.model.scale
        self.contract = contract or from_meta(getattr(self.model, "meta", None), self.task)
        o = options or PredictOptions()
        auto = AUTO["cuda" if self.device.startswith("cuda") else "cpu"]
        tile = o.tile or self.contract.tile or auto["tile"]
        overlap = o.overlap if 2 * o.overlap <= tile else tile // 4     # e.g. a style model's small training crop
        self.options = PredictOptions(**{**o.__dict__, "tile": tile, "overlap": overlap,
                                         "batch_pixels": o.batch_pixels or auto["batch_pixels"]})
        self.alpha_resize = build("bicubic", scale=self.scale, matlab_uint8=False).to(self.device)

    def _autocast(self):
        """bf16 / fp16 autocast on GPU where the architecture supports it (spandrel says per model): bf16
        falls back to fp16, fp16 to bf16, else fp32."""
        amp = self.options.amp
        if not self.device.startswith("cuda") or amp not in ("bf16", "fp16"):
            return contextlib.nullcontext()
        ok = {"bf16": getattr(self.model, "supports_bfloat16", True),
              "fp16": getattr(self.model, "supports_half", True)}
        pick = amp if ok[amp] else next((a for a in ("bf16", "fp16") if ok[a]), None)
        if pick is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if pick == "bf16" else torch.float16)

    def _model(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, h, w) -> float model output on the device (the 8-way mean with ``ensemble``)."""
        x = x.to(self.device, non_blocking=True)
        with self._autocast():
            if not self.options.ensemble:
                return self.model(x).float()
            acc = None
            for k in range(N_DIHEDRAL):
                y = dihedral_inverse(self.model(dihedral(x, k)).float(), k)
                acc = y if acc is None else acc + y
            return acc / N_DIHEDRAL

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Native geometry: integer (B, 3, h, w) tiles -> (B, C, s*h, s*w)."""
        return self._model(to_float(x.to(self.device, non_blocking=True)))

    def _forward_resized(self, x: torch.Tensor) -> torch.Tensor:
        """Resize geometry: (B, 3, h, w) windows -> logits (B, C, h, w): squashed to the training size
        as training squashed whole images, and back."""
        s, (h, w) = self.contract.size, x.shape[-2:]
        y = self._model(squash(to_float(x.to(self.device, non_blocking=True)), s, s))   # (B, C, s, s)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)

    def _mask(self, y: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) logits -> (B, H, W) uint8 mask: 255 where the logit exceeds the threshold (one
        class), or the argmax class (several)."""
        if y.shape[1] == 1:
            return ((y[:, 0] > self.contract.threshold).to(torch.uint8) * 255).cpu().numpy()
        return y.argmax(1).to(torch.uint8).cpu().numpy()

    def _finalizer(self, like: np.ndarray):
        """float (rows, W, C') band -> final array of the output's kind."""
        if self.task == "seg":
            return lambda band: self._mask(torch.from_numpy(band).permute(2, 0, 1)[None])[0]
        peak, dtype, gray = (65535.0, np.uint16, like.ndim == 2) if like.dtype == np.uint16 else (255.0, np.uint8,
                                                                                                   like.ndim == 2)

        def image(band):
            band = band.mean(-1) if gray else band
            return np.clip(np.round(band * peak), 0, peak).astype(dtype)
        return image

    @torch.inference_mode()
    def _infer(self, forward, x: torch.Tensor, scale: float, like: np.ndarray, finalize=None, tile=None,
               overlap: int | None = None) -> np.ndarray:
        o = self.options
        tile = tile or o.tile
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        return run_tiled(forward, x, scale, tile, o.overlap if overlap is None else overlap,
                         finalize or self._finalizer(like), max_batch=max(1, o.batch_pixels // (th * tw)))

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

    def _group(self, px: np.ndarray, i: int) -> tuple:
        """Images that can share a forward pass get the same key."""
        h, w = px.shape[:2]
        if self.contract.geometry == "resize":
            return ("resize",) if self.contract.window(h, w) is None else ("single", i)
        if h <= self.options.tile and w <= self.options.tile:
            return (h, w, px.dtype.str, px.ndim)
        return ("single", i)

    def run(self, images: list[tuple[np.ndarray, np.ndarray | None]]) -> list[Output | Exception]:
        """Outputs (or the exception that image raised) for decoded (pixels, alpha) pairs."""
        results: list[Output | Exception | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, (px, _) in enumerate(images):
            groups.setdefault(self._group(px, i), []).append(i)
        for key, idx in groups.items():
            h, w = images[idx[0]][0].shape[:2]
            side = self.contract.size if key == ("resize",) else None
            per_batch = max(1, self.options.batch_pixels // (side * side if side else h * w))
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
            return self._mask(y)
        peak = 65535.0 if like.dtype == np.uint16 else 255.0
        if like.ndim == 2:
            y = y.mean(1, keepdim=True)
        q = y.clamp(0, 1).mul(peak).round().permute(0, 2, 3, 1)
        q = q.to(torch.int32).cpu().numpy().astype(like.dtype) if peak > 255 else q.to(torch.uint8).cpu().numpy()
        return q[..., 0] if like.ndim == 2 else q

    @torch.inference_mode()
    def _run_chunk(self, images, chunk: list[int], results: list) -> None:
        px0, c = images[chunk[0]][0], self.contract
        if c.geometry == "resize":
            window = c.window(*px0.shape[:2])
            if window is not None:             # far larger than the training images: windows at their scale
                out = self._infer(self._forward_resized, as_tensor(px0), 1, px0, tile=window,
                                  overlap=round(c.window_overlap * min(window)))
                results[chunk[0]] = self._complete(px0, images[chunk[0]][1], out)
                return
            x = torch.cat([squash(to_float(as_tensor(images[i][0]).to(self.device)), c.size, c.size)
                           for i in chunk])                                        # (B, 3, size, size)
            y = self._model(x)                                                     # (B, C, size, size) logits
            for k, i in enumerate(chunk):
                px, alpha = images[i]
                logits = F.interpolate(y[k:k + 1], size=px.shape[:2], mode="bilinear", align_corners=False)
                results[i] = self._complete(px, alpha, self._mask(logits)[0])
            return
        if len(chunk) == 1 and max(px0.shape[:2]) > self.options.tile:
            out = self._infer(self._forward, as_tensor(px0), self.scale, px0)
            results[chunk[0]] = self._complete(px0, images[chunk[0]][1], out)
            return
        x = torch.cat([as_tensor(images[i][0]) for i in chunk])                    # (B, 3, h, w) integer
        y = self._quantize(self._forward(x), px0)                                  # (B, sh, sw[, 3])
        for k, i in enumerate(chunk):
            px, alpha = images[i]
            results[i] = self._complete(px, alpha, y[k])

    def predict(self, img: np.ndarray) -> np.ndarray:
        """The output array for one decoded image (raises what the model raised)."""
        out = self.run([(img, None)])[0]
        if isinstance(out, Exception):
            raise out
        return out.pixels
