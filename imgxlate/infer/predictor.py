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

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgxlate.artifact import load
from imgxlate.augment import N_DIHEDRAL, dihedral, dihedral_inverse
from imgxlate.errors import one_line
from imgxlate.infer import precision
from imgxlate.infer.contract import Contract, from_meta
from imgxlate.infer.devices import (  # noqa: F401 (the Predictor's device rules, re-exported)
    STICKY_CUDA,
    CudaUnusable,
    DeviceFailed,
    choose_device,
    cuda_problem,
    sticky_device_error,
)
from imgxlate.infer.tiling import Halted, run_tiled
from imgxlate.log import log, quiet
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
    elif why := zoo.unknown_name(spec):
        raise ValueError(why)
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
    elif why := zoo.unknown_name(spec):
        raise ValueError(why)
    return external.describe(spec)[1] if external.is_external(spec) else read_meta(spec)


def as_tensor(img: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8/uint16 -> (1, 3, H, W) integer view of the same memory (gray repeated, no copy)."""
    with quiet(UserWarning):                   # read-only arrays (from Arrow buffers) are never written to
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


def _bare(e: BaseException) -> BaseException:
    """``e`` without its traceback and the exceptions chained to it, whose frames would hold the failed call's
    tensors (device memory) for as long as the exception is kept as a result."""
    e.__context__ = e.__cause__ = None
    return e.with_traceback(None)


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
    amp: str = "auto"                  # 'auto', 'bf16', 'fp16' or 'off': see imgxlate.infer.precision
    batch_pixels: int | None = None    # small images of one size are batched up to this many pixels
    cutout: bool = False               # segmentation: write the RGBA cut-out instead of the mask
    ensemble: bool = False             # EDSR's 8-way geometric self-ensemble (sr / style)
    compile: bool = False              # torch.compile the model; a failed compile runs it eagerly (one warning)


# Measured on 2 CPU cores: a conv net runs 1.5-2x faster per pixel on 256 px tiles than on whole
# multi-megapixel images (the activations stay in cache), and batching small images does not help.
# A GPU wants large tiles and batches.
AUTO = {"cpu": {"tile": 256, "batch_pixels": 256 * 256}, "cuda": {"tile": 1024, "batch_pixels": 4 * 1024 * 1024}}
MIN_TILE = 64                          # running out of device memory halves tiles down to this side


@dataclass
class Output:
    pixels: np.ndarray                 # HxW or HxWx3, uint8 or uint16
    alpha: np.ndarray | None
    precision: str = "fp32"            # what the model ran at for this image (imgxlate.infer.precision)


class Predictor:
    """One model on one device, run as its contract says; call :meth:`run` with decoded images."""

    _contiguous = False                # the model could not run in channels_last (see _channels_last)
    halt = None                        # () -> bool: stop between model calls and rows of tiles (Halted)

    def __init__(self, model: str | nn.Module, scale: float | None = None, device: str | None = None,
                 options: PredictOptions | None = None, contract: Contract | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = resolve_model(model, scale, self.device) if isinstance(model, str) else model
        self.model.to(self.device).eval()
        self.on_gpu = self.device.startswith("cuda")    # where an error can leave the device broken (STICKY_CUDA)
        o = options or PredictOptions()
        self.precision, self.precision_reason = precision.resolve(o.amp, self.device, self.model)
        if self.precision != "fp32" and isinstance(model, str):     # a model given as a module is left as it is
            self._channels_last()
        self._compiled = self._compile() if o.compile else None
        self.task, self.scale = self.model.task, self.model.scale
        self.contract = contract or from_meta(getattr(self.model, "meta", None), self.task)
        auto = AUTO["cuda" if self.device.startswith("cuda") else "cpu"]
        tile = o.tile or self.contract.tile or auto["tile"]
        overlap = o.overlap if 2 * o.overlap <= tile else tile // 4     # e.g. a style model's small training crop
        batch_pixels = o.batch_pixels or auto["batch_pixels"]
        if self.device.startswith("cuda") and not o.batch_pixels:     # device memory goes with the output's pixels
            batch_pixels = max(tile * tile, batch_pixels // max(1, round(self.scale ** 2)))
        self.options = PredictOptions(**{**o.__dict__, "tile": tile, "overlap": overlap, "batch_pixels": batch_pixels})
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.startswith("cuda") else None
        self.alpha_resize = build("bicubic", scale=self.scale, matlab_uint8=False).to(self.device)

    def _channels_last(self) -> None:
        """The model in channels_last, what bf16 / fp16 kernels run fastest on; a third-party architecture that
        cannot run so (one that views its 4-D weights, say) is tried once on a small input and left as it was."""
        self.model.to(memory_format=torch.channels_last)
        if getattr(self.model, "arch", "") != "spandrel":
            return
        try:
            with torch.inference_mode(), precision.autocast(self.precision, self.device):
                side = 32 * max(1, self.model.descriptor.size_requirements.multiple_of)
                x = torch.rand(1, 3, side, side, device=self.device).contiguous(memory_format=torch.channels_last)
                self.model(x)
        except Exception:
            self.model.to(memory_format=torch.contiguous_format)
            self._contiguous = True

    def _compile(self):
        try:
            return torch.compile(self.model, dynamic=True)
        except Exception as e:                 # e.g. no C++ compiler, or a platform torch.compile does not support
            self._compile_failed(e)
            return None

    def _compile_failed(self, e: BaseException) -> None:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile of the model failed ({type(e).__name__}: {first}); running it eagerly",
                      RuntimeWarning, stacklevel=2)
        self._compiled = None

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward: compiled when asked and it compiles, else eager. When the compiled model fails, the
        eager one is tried: if it succeeds, compiling was at fault (eager from then on, with one warning); if it
        fails too, the input was (its error is raised, and the compiled model kept)."""
        if self._compiled is None:
            return self.model(x)
        try:
            return self._compiled(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            failure = _bare(e)
        y = self.model(x)
        self._compile_failed(failure)
        return y

    def _model(self, x: torch.Tensor, prec: str = "fp32") -> torch.Tensor:
        """float (B, 3, h, w) -> float model output on the device (the 8-way mean with ``ensemble``), run at
        ``prec`` (see imgxlate.infer.precision)."""
        x = x.to(self.device, non_blocking=True)
        if prec != "fp32" and not self._contiguous:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(prec, self.device):
            if not self.options.ensemble:
                return self._net(x).float()
            acc = None
            for k in range(N_DIHEDRAL):
                y = dihedral_inverse(self._net(dihedral(x, k)).float(), k)
                acc = y if acc is None else acc + y
            return acc / N_DIHEDRAL

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Native geometry: integer (B, 3, h, w) tiles -> (B, C, s*h, s*w)."""
        prec = precision.for_input(self.precision, x.dtype)
        return self._model(to_float(x.to(self.device, non_blocking=True)), prec)

    def _forward_resized(self, x: torch.Tensor) -> torch.Tensor:
        """Resize geometry: (B, 3, h, w) windows -> logits (B, C, h, w): squashed to the training size
        as training squashed whole images, and back."""
        s, (h, w) = self.contract.size, x.shape[-2:]
        prec = precision.for_input(self.precision, x.dtype)
        y = self._model(squash(to_float(x.to(self.device, non_blocking=True)), s, s), prec)   # (B, C, s, s)
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
                         finalize or self._finalizer(like), max_batch=max(1, o.batch_pixels // (th * tw)),
                         halt=self.halt)

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
        prec = precision.for_input(self.precision, pixels.dtype)
        if self.task != "seg":
            return Output(out, self._alpha(alpha), prec)
        if not self.options.cutout:
            return Output(out, None, prec)
        mask = out if pixels.dtype == np.uint8 else out.astype(np.uint16) * 257
        return Output(pixels, mask if alpha is None else np.minimum(alpha, mask), prec)

    def _group(self, px: np.ndarray, i: int) -> tuple:
        """Images that can share a forward pass get the same key."""
        h, w = px.shape[:2]
        if self.contract.geometry == "resize":
            return ("resize", px.dtype.str) if self.contract.window(h, w) is None else ("single", i)
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
            side = self.contract.size if key[0] == "resize" else None
            unit = side * side if side else h * w               # pixels of one image in a model call
            pending, staged = list(idx), None
            while pending:                     # cut anew after each chunk: running out of memory shrinks the budget
                if self.halt is not None and self.halt():
                    raise Halted("stopped at once, between model calls")
                per_batch = max(1, self.options.batch_pixels // unit)
                chunk, pending = pending[:per_batch], pending[per_batch:]
                ready = staged[1] if staged is not None and staged[0] == chunk else None
                following = pending[:per_batch]
                staged = (following, self._stage(images, following)) if following else None
                self._run_safely(images, chunk, results, ready, unit)   # the next chunk's copy overlaps this one
        return results

    def _run_safely(self, images, chunk: list[int], results: list, staged=None, unit: int = 1) -> None:
        """_run_chunk, with every exception a result: a chunk that fails is run image by image, so one bad image
        fails alone; on running out of device memory the batch (then the tile) is halved and the chunk run again
        in halves. Exceptions are kept without their traceback, whose frames would hold the failed batch's
        tensors (device memory) for as long as the result lives."""
        try:
            self._run_chunk(images, chunk, results, staged)
        except torch.OutOfMemoryError as e:
            e = _bare(e)
            if not self._shrink(len(chunk), unit):
                for i in chunk:
                    results[i] = e
                return
            half = (len(chunk) + 1) // 2
            for part in (chunk[:half], chunk[half:]):
                if part:
                    self._run_safely(images, part, results, unit=unit)
        except Exception as e:
            e = _bare(e)
            if self.on_gpu and sticky_device_error(e):  # every later image would fail too: not this image's
                raise DeviceFailed(f"the device is in an error state no later call can leave: "
                                   f"{one_line(e, 300)}") from None
            if len(chunk) == 1:
                results[chunk[0]] = e
                return
            for i in chunk:                     # isolate the failing image
                self._run_safely(images, [i], results, unit=unit)

    def _shrink(self, images: int, unit: int) -> bool:
        """After a call over ``images`` images of ``unit`` pixels each ran out of device memory: halve the pixels of
        one model call (the chunk is then run in halves, down to one image; for one tiled image, down to one tile a
        call), else the tile (native geometry, down to MIN_TILE, never a model's own tile), and say so; False when
        nothing is left to halve. A halved tile moves outputs only where tiles are blended (within a code). The
        budget stays halved for the Predictor's life: a device that ran out once is near its limit."""
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        o = self.options
        floor = unit if images > 1 else o.tile * o.tile
        if o.batch_pixels > floor:
            self.options = PredictOptions(**{**o.__dict__, "batch_pixels": max(floor, o.batch_pixels // 2)})
            log(f"out of device memory: model calls halved to {self.options.batch_pixels} input pixels")
            return True
        if images > 1:                          # the budget is at one image already: run them one at a time
            return True
        if self.contract.geometry == "native" and self.contract.tile is None and \
                o.tile // 2 >= max(MIN_TILE, 2 * o.overlap):
            self.options = PredictOptions(**{**o.__dict__, "tile": o.tile // 2,
                                             "batch_pixels": (o.tile // 2) ** 2})
            log(f"out of device memory with one {o.tile} px tile: tiles halved to {o.tile // 2} px")
            return True
        return False

    def _stage(self, images, chunk: list[int]):
        """On CUDA, a batch of small images of one size copied to the device from pinned host memory on a side
        stream, so that the copy overlaps the model running on the previous batch: (device tensor, event), or
        None where nothing is staged (CPU, resize geometry, one image that is tiled)."""
        if self._copy_stream is None or self.contract.geometry != "native":
            return None
        px0 = images[chunk[0]][0]
        if len(chunk) == 1 and max(px0.shape[:2]) > self.options.tile:
            return None
        try:
            parts = [as_tensor(images[i][0]) for i in chunk]
            host = torch.empty((len(parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
            torch.cat(parts, out=host)
            with torch.cuda.stream(self._copy_stream):
                x = host.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            return x, done, host                # host stays referenced until the chunk has used x
        except Exception:                       # out of pinned or device memory, an odd array: the chunk copies it
            return None                         # itself, and fails or shrinks there as one

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
    def _run_chunk(self, images, chunk: list[int], results: list, staged=None) -> None:
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
            y = self._model(x, precision.for_input(self.precision, px0.dtype))    # (B, C, size, size) logits
            for k, i in enumerate(chunk):
                px, alpha = images[i]
                logits = F.interpolate(y[k:k + 1], size=px.shape[:2], mode="bilinear", align_corners=False)
                results[i] = self._complete(px, alpha, self._mask(logits)[0])
            return
        if len(chunk) == 1 and max(px0.shape[:2]) > self.options.tile:
            out = self._infer(self._forward, as_tensor(px0), self.scale, px0)
            results[chunk[0]] = self._complete(px0, images[chunk[0]][1], out)
            return
        if staged is not None:                 # copied ahead on the side stream (_stage)
            x, done, _ = staged
            torch.cuda.current_stream(x.device).wait_event(done)
            x.record_stream(torch.cuda.current_stream(x.device))
        else:
            x = torch.cat([as_tensor(images[i][0]) for i in chunk])                # (B, 3, h, w) integer
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
