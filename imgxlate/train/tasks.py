"""What each task trains, one :class:`Task` per task: the stage plan, the model, the datasets and
objective, validation, and the inference contract the artifact will carry. Plain PyTorch: used by
ray_train.py on every worker and by the LR finder.

Validation runs the model through the batch job's :class:`~imgxlate.infer.predictor.Predictor` under the
stage's contract and scores it with :mod:`imgxlate.evaluate`, so the score a run reports is what
``imgxlate eval`` reports and what the batch job's outputs score.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from imgxlate import evaluate, pairing, pretrained
from imgxlate.degrade import PRESETS as DEGRADATIONS
from imgxlate.errors import CannotRun
from imgxlate.infer.contract import Contract, for_task
from imgxlate.infer.predictor import PredictOptions, Predictor
from imgxlate.io import images as image_io
from imgxlate.losses import style_size_of
from imgxlate.models import build, grow, make_config
from imgxlate.models.sr import SCALES
from imgxlate.train import data
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
    val: str | None = None                      # validation images (SR, style); default: a seeded 10% of `data`
                                                # held out from training (seg splits `data` by group)
    arch: str | None = None                     # default per task: sr / style / unet
    preset: str | None = None
    init: str | None = None                     # start from this trained model's weights (artifact or shipped name)
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
    limit: int | None = None                    # use at most this many training images (seg: pairs)
    cache_mb: float = data.DEFAULT_CACHE_MB     # per worker: decoded training images kept (LRU, by bytes)
    # SR
    hr_crop: int = 96
    samples_per_image: int = 8
    degradations: str = "none"                  # see imgxlate.degrade.PRESETS
    loss: str = "l1"                            # 'l1', 'mse' or 'perceptual'
    vgg_weights: str = "imagenet"
    # style
    style_image: str | None = None
    content_size: int = 256
    style_size: int | None = None               # style image resized to this shorter side for its Gram targets
                                                # (None: content_size; see losses.style_target)
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
    """Local paths made absolute (file:, file:// and ~ too): Ray Train workers do not run in the driver's working
    directory."""
    from imgxlate.io import storage

    fixed = {f: storage.local_path(v) for f in ("data", "val", "style_image", "storage", "out")
             if (v := getattr(cfg, f)) and storage.is_local(v)}
    return dataclasses.replace(cfg, **fixed)


def stage_loop(cfg: RunConfig, stage: Stage) -> LoopConfig:
    return dataclasses.replace(cfg.loop, epochs=stage.epochs, frozen_groups=stage.frozen_groups,
                               lr_ratios=stage.lr_ratios or cfg.loop.lr_ratios,
                               bn_freeze=stage.bn_freeze or cfg.loop.bn_freeze)


HELD_OUT = 0.1                                  # SR, style without --val: the fraction held out for validation


class DataError(CannotRun, ValueError):
    """The training data cannot make a run (nothing left to train on); the message says what to change."""


@dataclass
class DataPlan:
    """What a stage trains and validates on, decided from the listing and image headers before any
    image is decoded; the driver checks it before starting workers, every worker computes the same."""
    train: list                                 # URIs (seg: (image, mask) URI pairs)
    val: list                                   # the same, for validation
    keys: dict[str, str]                        # URI -> key relative to the data folder (for provenance)
    held_out: list[str] = field(default_factory=list)       # keys of `data` held out for validation
    skipped_small: list[str] = field(default_factory=list)  # keys of images smaller than the crop (SR)
    source_size: tuple[int, int] | None = None  # seg: median (h, w) of (up to 64 of) the training images
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict:
        return {"data_train_images": len(self.train), "data_val_images": len(self.val),
                "data_skipped_small": len(self.skipped_small)}

    def provenance(self) -> dict:
        return {"held_out": self.held_out, "skipped_small": self.skipped_small}


FP32 = PredictOptions(amp="off")        # validation measures the model itself; bf16's cost is measured at export


class StageData:
    """A stage's training dataset, objective, validation and contract, and the plan they come from.

    ``validate(predictor, lo, hi)`` scores held-out images lo..hi-1 and returns one dict of scores per image;
    ``summarise(rows)`` turns every image's scores into the run's metrics (default: the mean of each)."""

    def __init__(self, train, objective: nn.Module, contract: Contract, validate, device: str,
                 plan: DataPlan | None = None, summarise=None):
        self.train, self.objective, self.contract, self._validate, self.device = (
            train, objective, contract, validate, device)
        self.plan = plan
        self.summarise = summarise or mean_scores

    @torch.no_grad()
    def evaluate(self, model: nn.Module, amp: str = "off", share: tuple[int, int] = (0, 1)) -> dict:
        """The held-out metrics. ``share``: (rank, world size) when every worker of a run calls this together:
        each scores its own contiguous share of the images and the scores are gathered, so that no worker waits
        in a collective while one scores them all (past NCCL's time-out, on a large held-out set)."""
        was = model.training
        model.eval()
        options = FP32 if amp == "off" else PredictOptions(amp=amp)
        rank, world = share
        if world > 1:             # every rank scores rank 0's model, the one saved: batch norm's running statistics
            with torch.no_grad():     # (and an EMA's) moved apart in each rank's last steps
                for t in [*model.parameters(), *model.buffers()]:
                    torch.distributed.broadcast(t.data, src=0)
        n = len(self.plan.val) if self.plan is not None else 0
        lo, hi = (n * rank // world, n * (rank + 1) // world) if world > 1 else (0, n)
        try:
            rows = self._validate(Predictor(model, device=self.device, contract=self.contract, options=options),
                                  lo, hi)
        finally:
            model.train(was)
        if world > 1:
            parts: list = [None] * world
            torch.distributed.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        return self.summarise(rows)


def mean_scores(rows: list[dict]) -> dict:
    """Each score's mean over the images."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


# validation score -> the key (of imgxlate.infer.precision.LIMITS) its loss in bf16 is recorded under: what bf16
# loses of a score where higher is better (PSNR, Dice), what it adds to one where lower is (a style model's loss)
HIGHER_IS_BETTER = {"val_psnr": "psnr_db", "val_dice": "dice"}
LOWER_IS_BETTER = {"val_loss": "style_loss"}


def precision_cost(cfg: RunConfig, model: nn.Module, contract: Contract | None = None) -> dict:
    """bf16's quality cost against fp32 on the run's held-out validation images, through the Predictor under the
    artifact's contract (CPU autocast): ``{"bf16": {"psnr_db": fp32 - bf16, ...}}`` for config.json's
    ``precision_cost``, which ``--amp auto`` consults. A style model's cost is its validation loss's rise (no
    limit applies to it)."""
    task = task_of(cfg)
    td = task.stage_data(cfg, task.stages(cfg)[-1], "cpu")
    if contract is not None:
        td.contract = contract
    fp32 = td.evaluate(model, "off")
    model.to(memory_format=torch.channels_last)     # as the Predictor runs a loaded model in bf16
    bf16 = td.evaluate(model, "bf16")
    model.to(memory_format=torch.contiguous_format)
    cost = {**{name: fp32[k] - bf16[k] for k, name in HIGHER_IS_BETTER.items() if k in fp32},
            **{name: bf16[k] - fp32[k] for k, name in LOWER_IS_BETTER.items() if k in fp32}}
    cost = {k: round(v, 5) if math.isfinite(v) else None for k, v in cost.items()}   # JSON has no NaN / inf
    return {"bf16": {**cost, "on": f"{len(td.plan.val) if td.plan else '?'} held-out validation images of the "
                                   f"training run: fp32 minus bf16 (CPU autocast)"}}


class Task:
    """One task's training: override what differs."""
    name = ""
    arch = ""

    def default_stages(self, cfg: RunConfig) -> list[Stage]:
        return [Stage(epochs=cfg.loop.epochs)]

    def stages(self, cfg: RunConfig) -> list[Stage]:
        return cfg.stages or self.default_stages(cfg)

    stage_form, stage_flags = "VALUE:EPOCHS", ("",)        # --stages' items, as its error message says

    def parse_stage(self, value: int, epochs: int, flag: str, after_frozen: bool) -> Stage:
        return Stage(epochs=epochs)

    def build_model(self, cfg: RunConfig, stage: Stage, previous: nn.Module | None) -> tuple[nn.Module, list[str]]:
        """The model for a stage; the previous stage's model carries over (the first stage's: ``--init``'s)."""
        if previous is not None:
            return previous, []
        if cfg.init:
            from imgxlate.train.warmstart import initial_model
            return initial_model(cfg, self.name)
        arch, config = self.fresh_config(cfg, stage)
        return build(arch, config, encoder_state=pretrained.encoder_state(config)), []

    def fresh_config(self, cfg: RunConfig, stage: Stage) -> tuple[str, object]:
        """(architecture, config) of the model a first stage builds without ``--init``."""
        arch = cfg.arch or self.arch
        return arch, make_config(arch, None, cfg.preset, **cfg.model)

    def contract(self, cfg: RunConfig, stage: Stage, source_size=None) -> Contract:
        return for_task(self.name)

    def plan(self, cfg: RunConfig, stage: Stage) -> DataPlan:
        """Training images and validation images: ``--val``, or a seeded HELD_OUT of the training images
        that is never trained on."""
        items = data.list_items(cfg.data, cfg.limit, cfg.storage)
        keys = {it.source_uri: it.key for it in items}
        warnings = []
        if cfg.val:
            train, val, held_out = items, data.list_items(cfg.val, exclude=cfg.storage), []
            if not val:
                raise DataError(f"no images under --val {cfg.val}")
            if shared := set(keys) & {it.source_uri for it in val}:     # scores of fit, not of generalisation
                warnings.append(f"{len(shared)} of the {len(val)} --val images are training images too")
        else:
            train, val = data.held_out_split(items, HELD_OUT, cfg.seed)
            held_out = [it.key for it in val]
            if not val:
                raise DataError(f"{cfg.data} has {len(items)} image(s): holding {HELD_OUT:.0%} out for validation "
                                f"needs at least 2; add images or pass --val")
        return DataPlan([it.source_uri for it in train], [it.source_uri for it in val], keys, held_out,
                        warnings=warnings)

    def check(self, cfg: RunConfig) -> list[DataPlan]:
        """Every stage's plan, or a DataError that says what to change: run before any worker starts."""
        plans = [self.plan(cfg, s) for s in self.stages(cfg)]
        for p in plans:
            if not p.train:
                raise DataError(p.warnings[-1] if p.warnings else f"no training images in {cfg.data}")
        return plans

    def stage_data(self, cfg: RunConfig, stage: Stage, device: str) -> StageData:
        raise NotImplementedError


class SrTask(Task):
    name, arch = "sr", "sr"

    def default_stages(self, cfg):
        return [Stage(epochs=cfg.loop.epochs, scale=cfg.model.get("scale", 2))]

    stage_form, stage_flags = "SCALE:EPOCHS or SCALE:EPOCHS:new", ("", "new")

    def parse_stage(self, value, epochs, flag, after_frozen):
        if value not in SCALES:
            raise DataError(f"--stages: scale {value} is not one of {', '.join(map(str, SCALES))}")
        return Stage(epochs=epochs, scale=value, train="new" if flag == "new" else "all")

    def build_model(self, cfg, stage, previous):
        scale = stage.scale or 2
        if previous is not None and previous.scale != scale:
            return grow(previous, scale)
        if previous is None and cfg.init:                # ':new' trains what --init's growth added or widened
            from imgxlate.train.warmstart import initial_model
            previous, new = initial_model(cfg, self.name)
            if previous.scale == scale:
                return previous, new
            grown, added = grow(previous, scale)
            return grown, new + added
        if previous is not None:
            return previous, []
        return build(*self.fresh_config(cfg, stage)), []

    def fresh_config(self, cfg, stage):
        arch = cfg.arch or self.arch
        config = make_config(arch, cfg.model or None, cfg.preset, scale=stage.scale or 2)
        if getattr(config, "scale", 2) not in SCALES:
            raise ValueError(f"SR scale must be one of {SCALES}, got {config.scale}")
        return arch, config

    def plan(self, cfg, stage):
        """Training images smaller than the stage's HR crop are skipped (a batch stacks crops of one size)."""
        plan = super().plan(cfg, stage)
        crop = data.sr_crop(cfg.hr_crop, stage.scale or 2)
        side, bad = image_io.shorter_sides(plan.train + plan.val)            # headers only
        if bad:
            plan.train, plan.val = [u for u in plan.train if u in side], [u for u in plan.val if u in side]
            plan.warnings.append(f"{len(bad)} images cannot be read and are left out, e.g. {bad[0]}")
        side = {u: side[u] for u in plan.train}
        small = [u for u in plan.train if side[u] < crop]
        if small:
            plan.train = [u for u in plan.train if side[u] >= crop]
            plan.skipped_small = [plan.keys[u] for u in small]
            shown = ", ".join(plan.skipped_small[:5]) + (", ..." if len(small) > 5 else "")
            smallest = min(side[u] for u in small)
            plan.warnings.append(
                f"{len(small)} of {len(side)} training images are smaller than the {crop} px HR crop and are "
                f"skipped ({shown}); --hr-crop {smallest - smallest % (stage.scale or 2)} would keep them"
                if plan.train else
                f"every training image under {cfg.data} is smaller than the {crop} px HR crop (the largest has a "
                f"{max(side.values())} px shorter side): pass a smaller --hr-crop")
        return plan

    def stage_data(self, cfg, stage, device):
        plan = self.plan(cfg, stage)
        scale = stage.scale or 2
        train = data.SrDataset(plan.train, scale, cfg.hr_crop, cfg.samples_per_image, DEGRADATIONS[cfg.degradations],
                               cfg.seed, cache=data.shared_cache(cfg.cache_mb))

        def validate(predictor, lo, hi):       # validation images are read as they are scored, never all held
            rows = evaluate.eval_sr(predictor, ((u, image_io.read_image(u)) for u in plan.val[lo:hi]), scale,
                                    degradations=cfg.degradations, seed=cfg.seed, first_index=lo)
            return [{"val_psnr": r.psnr, "val_ssim": r.ssim, "val_psnr_bicubic": r.psnr_bicubic} for r in rows]

        def summarise(rows):
            return {**mean_scores(rows), "val_protocol": evaluate.metrics.PROTOCOL_Y} if rows else {}
        return StageData(train, SrObjective(cfg.loss, cfg.vgg_weights), self.contract(cfg, stage), validate, device,
                         plan, summarise)


class StyleTask(Task):
    name, arch = "style", "style"

    def stage_data(self, cfg, stage, device):
        plan = self.plan(cfg, stage)
        train = data.CropDataset(plan.train, cfg.content_size, cfg.samples_per_image, cfg.seed,
                                 cache=data.shared_cache(cfg.cache_mb))
        style = image_io.read_rgb(cfg.style_image)
        objective = StyleObjective(style, style_size_of(dataclasses.asdict(cfg)), cfg.vgg_weights, cfg.content_weight)

        def validate(predictor, lo, hi):
            rows = evaluate.eval_style(predictor, ((u, image_io.read_rgb(u)) for u in plan.val[lo:hi]), style,
                                       cfg.content_size, loss=objective.loss)
            return [{f"val_{n}": float(v) for n, v in r.terms.items()} for r in rows]

        def summarise(rows):
            terms = mean_scores(rows)
            return {"val_loss": float(sum(terms.values())), **terms} if terms else {}
        return StageData(train, objective, self.contract(cfg, stage), validate, device, plan, summarise)

    def contract(self, cfg, stage, source_size=None):
        return for_task("style", tile=cfg.content_size)


class SegTask(Task):
    name, arch = "seg", "unet"

    def default_stages(self, cfg):
        return [Stage(epochs=cfg.loop.epochs, size=128)]

    stage_form, stage_flags = "SIZE:EPOCHS or SIZE:EPOCHS:frozen", ("", "frozen")

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

    def plan(self, cfg, stage):
        """Pairs split by group (car id); the contract's source size from the headers of up to 64 evenly
        spaced training images (the median, so a few odd sizes do not move it)."""
        items = data.list_items(cfg.data, exclude=cfg.storage)
        keys = {it.source_uri: it.key for it in items}
        pairs = pairing.pair_segmentation([it.source_uri for it in items], limit=cfg.limit)
        train, val = pairing.grouped_split(pairs, cfg.val_fraction, seed=cfg.seed)
        probe = train[:: max(1, len(train) // 64)][:64]
        source = tuple(int(v) for v in np.median([image_io.image_size(i) for i, _ in probe], axis=0)) if probe else None
        one = [] if val or not train else ["every pair is of one group (car id): none is held out, and validation "
                                           "scores a training image; add more groups"]
        return DataPlan(train, val or train[:1], keys, [keys[i] for i, _ in val], source_size=source, warnings=one)

    def stage_data(self, cfg, stage, device):
        plan = self.plan(cfg, stage)
        train = data.SegDataset(plan.train, stage.size or 128, augment=True, seed=cfg.seed,
                                cache=data.shared_cache(cfg.cache_mb))

        def validate(predictor, lo, hi):
            rows = evaluate.eval_seg(predictor, evaluate.read_seg_samples(plan.val[lo:hi]), keep_pictures=False)
            return [{f"val_{k}": float(getattr(r, k)) for k in ("dice", "iou", "accuracy")} for r in rows]
        return StageData(train, SegObjective(cfg.seg_loss), self.contract(cfg, stage, plan.source_size), validate,
                         device, plan)


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
