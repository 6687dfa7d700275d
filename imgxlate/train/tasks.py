"""What each task trains, one :class:`Task` per task: the stage plan, the model, the datasets and
objective, validation, and the inference contract the artifact will carry. Plain PyTorch: used by
ray_train.py on every worker and by the LR finder.

Validation runs the model through the batch job's :class:`~imgxlate.infer.predictor.Predictor` under the
stage's contract and scores it with :mod:`imgxlate.evaluate`, so the score a run reports is what
``imgxlate eval`` reports and what the batch job's outputs score.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from imgxlate import evaluate, pretrained
from imgxlate.infer.contract import Contract, for_task
from imgxlate.infer.predictor import Predictor
from imgxlate.io import images as image_io
from imgxlate.models import build, grow, make_config
from imgxlate.train import data
from imgxlate.train.degrade import PRESETS as DEGRADATIONS
from imgxlate.train.loop import LoopConfig
from imgxlate.train.objectives import SegObjective, SrObjective, StyleObjective


@dataclass
class Stage:
    """One stage of a progressive plan."""
    epochs: int
    scale: int | None = None                    # sr: the stage's scale (a larger one grows the model)
    train: str = "all"                          # sr: 'new' trains only the layers the growth added
    size: int | None = None                     # seg: input side the images are squashed to
    frozen_groups: tuple[int, ...] = ()         # seg: encoder groups not trained (':frozen')
    lr_ratios: tuple[float, ...] = ()           # discriminative LRs per layer group
    bn_freeze: bool = False                     # keep the pretrained groups' batch-norm statistics

    @classmethod
    def from_dict(cls, d: dict) -> Stage:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class RunConfig:
    """A training run: task, data, model, stage plan, loop settings and where it is stored."""
    task: str                                   # 'sr', 'style' or 'seg'
    data: str                                   # training images (folder, s3:// prefix or manifest)
    name: str = "run"
    storage: str = "runs"                       # local folder or s3://bucket/prefix for checkpoints
    val: str | None = None                      # validation images (SR, style); seg splits `data` by group
    arch: str | None = None                     # default per task: sr / style / unet
    preset: str | None = None
    model: dict = field(default_factory=dict)   # config overrides, e.g. {"nf": 32}
    stages: list[Stage] = field(default_factory=list)   # default per task: Task.default_stages
    loop: LoopConfig = field(default_factory=LoopConfig)
    batch_size: int = 16                        # per worker
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement: str = "PACK"                     # Ray placement strategy of the workers (STRICT_SPREAD: 1 per node)
    max_failures: int = 2
    seed: int = 0
    limit: int | None = None                    # use at most this many training images
    # SR
    hr_crop: int = 96
    samples_per_image: int = 8
    degradations: str = "none"                  # see imgxlate.train.degrade.PRESETS
    loss: str = "l1"                            # 'l1', 'mse' or 'perceptual'
    vgg_weights: str = "imagenet"
    # style
    style_image: str | None = None
    content_size: int = 256
    content_weight: float = 1e4
    # seg
    val_fraction: float = 0.2
    seg_loss: str = "bce_dice"                  # 'bce' (the lesson's) or 'bce_dice' (BCE + soft Dice)
    out: str | None = None                      # artifact URI (default: <storage>/<name>/model)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        d["loop"] = LoopConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["loop"].items()})
        d["stages"] = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in d.get("stages", [])]
        return cls(**d)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute: Ray Train workers do not run in the driver's working directory."""
    import os

    from imgxlate.io import storage

    fixed = {f: os.path.abspath(v) for f in ("data", "val", "style_image", "storage", "out")
             if (v := getattr(cfg, f)) and storage.is_local(v)}
    return dataclasses.replace(cfg, **fixed)


def stage_loop(cfg: RunConfig, stage: Stage) -> LoopConfig:
    return dataclasses.replace(cfg.loop, epochs=stage.epochs, frozen_groups=stage.frozen_groups,
                               lr_ratios=stage.lr_ratios or cfg.loop.lr_ratios,
                               bn_freeze=stage.bn_freeze or cfg.loop.bn_freeze)


class StageData:
    """A stage's training dataset, objective, validation and contract."""

    def __init__(self, train, objective: nn.Module, contract: Contract, validate, device: str):
        self.train, self.objective, self.contract, self._validate, self.device = (
            train, objective, contract, validate, device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        was = model.training
        model.eval()
        try:
            return self._validate(Predictor(model, device=self.device, contract=self.contract))
        finally:
            model.train(was)


class Task:
    """One task's training: override what differs."""
    name = ""
    arch = ""

    def default_stages(self, cfg: RunConfig) -> list[Stage]:
        return [Stage(epochs=cfg.loop.epochs)]

    def stages(self, cfg: RunConfig) -> list[Stage]:
        return cfg.stages or self.default_stages(cfg)

    def parse_stage(self, value: int, epochs: int, flag: str, after_frozen: bool) -> Stage:
        return Stage(epochs=epochs)

    def parse_stages(self, text: str | None) -> list[Stage]:
        """'2:3,4:1:new,4:2' (SR scale:epochs[:new]) or '128:2:frozen,128:2,256:2' (seg size:epochs[:frozen])."""
        stages: list[Stage] = []
        for item in (text or "").split(","):
            if not item.strip():
                continue
            parts = item.strip().split(":")
            flag = parts[2] if len(parts) > 2 else ""
            stages.append(self.parse_stage(int(parts[0].lstrip("x")), int(parts[1]), flag,
                                           any(s.frozen_groups for s in stages)))
        return stages

    def build_model(self, cfg: RunConfig, stage: Stage, previous: nn.Module | None) -> tuple[nn.Module, list[str]]:
        """The model for a stage; the previous stage's model carries over."""
        if previous is not None:
            return previous, []
        arch = cfg.arch or self.arch
        config = make_config(arch, None, cfg.preset, **cfg.model)
        return build(arch, config, encoder_state=pretrained.encoder_state(config)), []

    def contract(self, cfg: RunConfig, stage: Stage, source_size=None) -> Contract:
        return for_task(self.name)

    def stage_data(self, cfg: RunConfig, stage: Stage, device: str) -> StageData:
        raise NotImplementedError


class SrTask(Task):
    name, arch = "sr", "sr"

    def default_stages(self, cfg):
        return [Stage(epochs=cfg.loop.epochs, scale=cfg.model.get("scale", 2))]

    def parse_stage(self, value, epochs, flag, after_frozen):
        return Stage(epochs=epochs, scale=value, train="new" if flag == "new" else "all")

    def build_model(self, cfg, stage, previous):
        scale = stage.scale or 2
        if previous is not None and previous.scale != scale:
            return grow(previous, scale)
        if previous is not None:
            return previous, []
        return build(cfg.arch or self.arch, cfg.model or None, preset=cfg.preset, scale=scale), []

    def stage_data(self, cfg, stage, device):
        uris = data.list_images(cfg.data, cfg.limit)
        scale = stage.scale or 2
        train = data.SrDataset(uris, scale, cfg.hr_crop, cfg.samples_per_image, DEGRADATIONS[cfg.degradations],
                               cfg.seed)
        val = [(u, image_io.read_image(u)) for u in (data.list_images(cfg.val) if cfg.val else
                                                     uris[: max(1, len(uris) // 10)])]

        def validate(predictor):
            rows = evaluate.eval_sr(predictor, val, scale)
            return {"val_psnr": float(np.mean([r.psnr for r in rows])),
                    "val_ssim": float(np.mean([r.ssim for r in rows])),
                    "val_psnr_bicubic": float(np.mean([r.psnr_bicubic for r in rows])),
                    "val_protocol": evaluate.metrics.PROTOCOL_Y}
        return StageData(train, SrObjective(cfg.loss, cfg.vgg_weights), self.contract(cfg, stage), validate, device)


class StyleTask(Task):
    name, arch = "style", "style"

    def stage_data(self, cfg, stage, device):
        uris = data.list_images(cfg.data, cfg.limit)
        train = data.CropDataset(uris, cfg.content_size, cfg.samples_per_image, cfg.seed)
        style = image_io.read_rgb(cfg.style_image)
        objective = StyleObjective(torch.from_numpy(style).permute(2, 0, 1).float()[None] / 255, cfg.vgg_weights,
                                   cfg.content_weight)
        val = [(u, image_io.read_rgb(u)) for u in (data.list_images(cfg.val) if cfg.val else uris[:1])]

        def validate(predictor):
            rows = evaluate.eval_style(predictor, val, style, cfg.content_size, objective=objective)
            terms = {n: float(np.mean([r.terms[n] for r in rows])) for n in rows[0].terms}
            return {"val_loss": float(sum(terms.values())), **{f"val_{n}": v for n, v in terms.items()}}
        return StageData(train, objective, self.contract(cfg, stage), validate, device)

    def contract(self, cfg, stage, source_size=None):
        return for_task("style", tile=cfg.content_size)


class SegTask(Task):
    name, arch = "seg", "unet"

    def default_stages(self, cfg):
        return [Stage(epochs=cfg.loop.epochs, size=128)]

    def parse_stage(self, value, epochs, flag, after_frozen):
        """A stage after a frozen one trains everything with discriminative LRs (encoder x0.1) and the
        encoder's batch norm frozen, as the lesson does after unfreezing."""
        if flag == "frozen":
            return Stage(epochs=epochs, size=value, frozen_groups=(0,))
        if after_frozen:
            return Stage(epochs=epochs, size=value, lr_ratios=(0.1, 1.0), bn_freeze=True)
        return Stage(epochs=epochs, size=value)

    def contract(self, cfg, stage, source_size=None):
        return for_task("seg", size=stage.size or 128, source_size=source_size)

    def stage_data(self, cfg, stage, device):
        pairs = data.pair_segmentation(data.list_images(cfg.data), limit=cfg.limit)
        train_pairs, val_pairs = data.grouped_split(pairs, cfg.val_fraction, seed=cfg.seed)
        size = stage.size or 128
        train = data.SegDataset(train_pairs, size, augment=True, seed=cfg.seed)
        shapes = np.array([img.shape[:2] for img in train.images])
        source = tuple(int(v) for v in np.median(shapes, axis=0)) if len(shapes) else None
        val = list(evaluate.read_seg_samples(val_pairs or train_pairs[:1]))

        def validate(predictor):
            rows = evaluate.eval_seg(predictor, val, keep_pictures=False)
            return {f"val_{k}": float(np.mean([getattr(r, k) for r in rows])) for k in ("dice", "iou", "accuracy")}
        return StageData(train, SegObjective(cfg.seg_loss), self.contract(cfg, stage, source), validate, device)


TASKS: dict[str, Task] = {t.name: t for t in (SrTask(), StyleTask(), SegTask())}


def task_of(cfg: RunConfig) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; tasks: {', '.join(TASKS)}")
    return TASKS[cfg.task]


def trainable_groups(model: nn.Module, stage: Stage, new_params: list[str]) -> list[nn.Module]:
    """Layer groups for LR ratios / freezing, with the stage's freezing applied (requires_grad): SR
    'train: new' freezes all but the grown layers, seg ':frozen' its frozen groups. Called before the
    model is wrapped in DDP, which registers only the parameters that require gradients then: a group
    frozen after wrapping would leave DDP waiting for gradients that never come."""
    only_new = stage.train == "new" and bool(new_params)
    for n, p in model.named_parameters():
        p.requires_grad_(n in new_params if only_new else True)
    groups = model.encoder_groups() if hasattr(model, "encoder_groups") else [model]
    for i in stage.frozen_groups:
        groups[i].requires_grad_(False)
    return groups
