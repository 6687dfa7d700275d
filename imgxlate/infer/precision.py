"""Which precision a model runs at: the one ``--amp`` rule of ``translate``, ``eval`` and training's validation.

    off    fp32, everywhere.
    bf16   bfloat16 autocast (channels_last), on CPU as on GPU, where the architecture supports it (spandrel says
           per model; imgxlate's own do); else fp16 where it supports that on a GPU; else fp32.
    fp16   float16 autocast on a GPU (bf16 where the architecture takes only that); refused on CPU, where it is
           neither native nor faster.
    auto   bf16 where (1) the device runs it natively (a CPU with AVX512-BF16 or AMX; a GPU of compute capability
           8.0 or more), (2) the architecture supports it, and (3) the model's recorded bf16 quality cost is within
           LIMITS (PSNR 0.02 dB, Dice 0.001: measured against fp32 on held-out images when the artifact was
           exported, ``config.json``'s ``precision_cost``); fp32 elsewhere, with the reason.

Two kinds of input never run in reduced precision whatever the choice: 16-bit images (bf16 keeps 8 bits of
mantissa, so a 16-bit output would keep 8-9 real bits) and the zero-parameter ``bicubic`` baseline (exact MATLAB
imresize). The precision each output was made with is in its manifest row (``precision``), and the run's choice
is part of the recipe, so a rerun with another choice redoes the outputs and ``eval`` with the same ``--amp``
scores what the job wrote.

The job resolves ``auto`` once, in the driver, for the device kind its model actors get, and hands the actors the
resolved precision, so every row of a run is made the same way whatever node it ran on.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform

import torch
from torch import nn

AMPS = ("auto", "bf16", "fp16", "off")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The most a reduced precision may cost for `auto` to choose it, per score (fp32's score minus its own).
LIMITS = {"psnr_db": 0.02, "dice": 0.001}


class PrecisionError(ValueError):
    """An --amp that cannot run on this device (fp16 on CPU) or an unknown one."""


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> str | None:
    """The CPU feature that runs bf16 natively ('amx_bf16', 'avx512_bf16', or aarch64's 'bf16'), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        return None
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    return "bf16" if platform.machine() in ("aarch64", "arm64") and "bf16" in flags else None


def device_bf16_native(device: str, probe: bool = True) -> tuple[bool, str]:
    """(whether ``device`` runs bf16 natively, what it is) for 'cpu' or 'cuda[:n]'. ``probe=False``: a GPU is not
    asked (the job's driver, which must not open a CUDA context on the GPU its actors use, and usually has none):
    it is taken to be of compute capability 8.0 or more, as every data-centre GPU since 2020 is."""
    if device.startswith("cuda"):
        if not probe or not torch.cuda.is_available():
            return True, "the actors' GPU (taken to be of compute capability 8.0 or more)"
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        name = f"{torch.cuda.get_device_name(torch.device(device))} (compute capability {major}.{minor})"
        return major >= 8, name
    flag = cpu_bf16_native()
    return flag is not None, f"this CPU ({flag})" if flag else "this CPU (no avx512_bf16, amx_bf16 or bf16 flag)"


def exact(model: nn.Module) -> bool:
    """A model whose outputs must stay fp32: no parameters to speed up (bicubic: exact MATLAB imresize)."""
    return getattr(model, "arch", "") == "bicubic" or not any(True for _ in model.parameters())


def recorded_cost(model: nn.Module, precision: str) -> dict | None:
    """The quality cost of ``precision`` against fp32 recorded in the model's config.json, e.g. {"psnr_db": 0.003,
    "on": "..."}; None when nothing usable was recorded (no record, not a mapping, or no finite score in it)."""
    costs = (getattr(model, "meta", None) or {}).get("precision_cost")
    cost = costs.get(precision) if isinstance(costs, dict) else None
    if not isinstance(cost, dict):
        return None
    scores = {k: v for k, v in cost.items() if k in LIMITS}
    if not scores or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values()):
        return None
    return cost


def over_limit(cost: dict) -> list[str]:
    """The scores of a recorded cost that pass LIMITS, as text."""
    return [f"{k} cost {cost[k]:.4f} > {limit}" for k, limit in LIMITS.items() if k in cost and cost[k] > limit]


def resolve(amp: str, device: str, model: nn.Module, probe: bool = True) -> tuple[str, str]:
    """(precision, why) for ``amp`` on ``device`` ('cpu' or 'cuda[:n]') and ``model``: 'fp32', 'bf16' or 'fp16'.
    ``probe``: see device_bf16_native. A precision asked for by name is run as asked (bf16 on a GPU older than
    compute capability 8.0 runs emulated, slowly, rather than silently in fp16)."""
    if amp not in AMPS:
        raise PrecisionError(f"unknown --amp {amp!r}: use {', '.join(AMPS)}")
    gpu = device.startswith("cuda")
    if amp == "fp16" and not gpu:
        raise PrecisionError("--amp fp16 runs on GPUs only; on a CPU use --amp bf16 or auto")
    if amp == "off":
        return "fp32", "--amp off"
    if exact(model):
        return "fp32", "a model without parameters (bicubic) always runs in fp32"
    allowed = {"bf16": getattr(model, "supports_bfloat16", True), "fp16": gpu and getattr(model, "supports_half", True)}
    if amp == "auto":
        native, what = device_bf16_native(device, probe)
        if not native:
            return "fp32", f"auto: {what} does not run bf16 natively"
        if not allowed["bf16"]:
            return "fp32", "auto: the architecture does not support bf16"
        cost = recorded_cost(model, "bf16")
        if cost is None and getattr(model, "arch", "") != "spandrel":
            return "fp32", ("auto: the model records no bf16 quality cost, so it runs in fp32 (measure and record "
                            "it: python jobs/ship_model.py NAME --precision-only --artifact PATH --eval DATA; or "
                            "give --amp bf16)")
        if cost is not None and (bad := over_limit(cost)):
            return "fp32", f"auto: bf16 costs too much quality for this model ({'; '.join(bad)})"
        why = f"measured cost {_cost_text(cost)}" if cost else "spandrel: the architecture supports bf16"
        return "bf16", f"auto: native on {what}; {why}"
    pick = amp if allowed[amp] else next((a for a in ("bf16", "fp16") if allowed[a]), None)
    if pick is None:
        return "fp32", f"--amp {amp}: the architecture supports neither bf16 nor fp16"
    return pick, f"--amp {amp}" + ("" if pick == amp else f": the architecture takes {pick}, not {amp}")


def _cost_text(cost: dict) -> str:
    return ", ".join(f"{k} {v:+.4f}" for k, v in cost.items() if isinstance(v, (int, float)))


def autocast(precision: str, device: str):
    """The autocast context of a resolved precision (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=DTYPES[precision])


def for_input(precision: str, pixels_dtype) -> str:
    """The precision one input runs at: 16-bit images stay fp32."""
    return "fp32" if str(pixels_dtype) in ("uint16", "torch.uint16") else precision
