"""Model families, each a dataclass config plus an nn.Module, in one registry.

    bicubic        zero parameters, any scale: the baseline and the test double
    sr             the lesson's SrResnet / EDSR (presets: lesson, edsr-baseline, edsr, tiny)
    style          the lesson's StyleResnet (fast style transfer)
    unet           U-Net on a ResNet34 encoder
    upsample_head  the lesson's non-U-Net baseline on the same encoder

Every model maps (B, 3, H, W) RGB in [0, 1] to (B, C, scale*H, scale*W) and carries ``arch``,
``task`` ('sr', 'style' or 'seg'), ``scale`` and ``config``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from imgxlate.models.bicubic import Bicubic, BicubicConfig
from imgxlate.models.sr import PRESETS as SR_PRESETS
from imgxlate.models.sr import SrConfig, SrResnet, grow
from imgxlate.models.style import StyleConfig, StyleResnet
from imgxlate.models.unet import Unet, UnetConfig, UpsampleHead

REGISTRY: dict[str, tuple[type, type[nn.Module]]] = {
    "bicubic": (BicubicConfig, Bicubic),
    "sr": (SrConfig, SrResnet),
    "style": (StyleConfig, StyleResnet),
    "unet": (UnetConfig, Unet),
    "upsample_head": (UnetConfig, UpsampleHead),
}

PRESETS: dict[str, dict[str, object]] = {"sr": SR_PRESETS}


def make_config(arch: str, config: object | dict | None = None, preset: str | None = None, **overrides):
    """The config dataclass for ``arch``, built in layers: the preset (or the defaults), then the
    fields of ``config`` (a dict, e.g. ``--model-config`` JSON), then ``overrides``; so
    ``make_config('sr', {'nf': 32}, preset='edsr-baseline')`` is EDSR-baseline with 32 channels.
    A config dataclass is taken as it is (with ``overrides``) and cannot be combined with a preset."""
    if arch not in REGISTRY:
        raise KeyError(f"unknown model {arch!r}; registered: {', '.join(REGISTRY)}")
    cls = REGISTRY[arch][0]
    base = cls()
    if preset is not None:
        presets = PRESETS.get(arch, {})
        if preset not in presets:
            raise KeyError(f"unknown {arch} preset {preset!r}; presets: {', '.join(presets) or 'none'}")
        base = presets[preset]
    if isinstance(config, cls):
        if preset is not None:
            raise ValueError(f"{arch}: give a preset or a config object, not both")
        base, config = config, None
    fields = {**(config or {}), **overrides}
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{arch}: unknown config fields {sorted(unknown)}")
    return dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def build(arch: str, config: object | dict | None = None, *, preset: str | None = None,
          encoder_state: dict | None = None, **overrides) -> nn.Module:
    """A fresh model of a registered family. Models never read files: pretrained encoder weights come
    in as a state_dict (``encoder_state``, see imgxlate.pretrained)."""
    cfg = make_config(arch, config, preset, **overrides)
    cls = REGISTRY[arch][1]
    if arch in ("unet", "upsample_head"):
        return cls(cfg, encoder_state=encoder_state)
    return cls(cfg)


__all__ = ["REGISTRY", "PRESETS", "build", "make_config", "grow",
           "Bicubic", "SrResnet", "StyleResnet", "Unet", "UpsampleHead"]
