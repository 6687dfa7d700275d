"""What each task trains: the training-run config, and per task the model, datasets, objective,
validation and stage plan. Plain PyTorch: used by ray_train.py on every worker."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from imgxlate import metrics
from imgxlate.infer.predictor import predict_array
from imgxlate.models import build, grow
from imgxlate.train import data
from imgxlate.train.degrade import PRESETS as DEGRADATIONS
from imgxlate.train.loop import LoopConfig
from imgxlate.train.objectives import SegObjective, SrObjective, StyleObjective


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
    stages: list[dict] = field(default_factory=list)   # default per task; see default_stages()
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
    out: str | None = None                      # artifact URI (default: <storage>/<name>/model)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute: Ray Train workers do not run in the driver's working directory."""
    import os

    from imgxlate.io import storage

    fixed = {f: os.path.abspath(v) for f in ("data", "val", "style_image", "storage", "out")
             if (v := getattr(cfg, f)) and storage.is_local(v)}
    return dataclasses.replace(cfg, **fixed)


def default_stages(cfg: RunConfig) -> list[dict]:
    if cfg.stages:
        return cfg.stages
    if cfg.task == "sr":
        return [{"scale": cfg.model.get("scale", 2), "epochs": cfg.loop.epochs}]
    if cfg.task == "seg":
        return [{"size": 128, "epochs": cfg.loop.epochs}]
    return [{"epochs": cfg.loop.epochs}]


def stage_loop(cfg: RunConfig, stage: dict) -> LoopConfig:
    fields = {f.name for f in dataclasses.fields(LoopConfig)}
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in stage.items() if k in fields}
    return dataclasses.replace(cfg.loop, **over)


def build_model(cfg: RunConfig, stage: dict, previous: nn.Module | None) -> tuple[nn.Module, list[str]]:
    """The model for a stage; carries the previous stage's weights over (growing SR models)."""
    arch = cfg.arch or {"sr": "sr", "style": "style", "seg": "unet"}[cfg.task]
    if cfg.task == "sr":
        scale = stage.get("scale", 2)
        if previous is not None and previous.scale != scale:
            return grow(previous, scale)
        if previous is not None:
            return previous, []
        return build(arch, cfg.model or None, preset=cfg.preset, **{"scale": scale}), []
    if previous is not None:
        return previous, []
    overrides = {k: v for k, v in cfg.model.items()}
    return build(arch, preset=cfg.preset, **overrides), []


def trainable_groups(model: nn.Module, stage: dict, new_params: list[str]) -> list[nn.Module]:
    """Layer groups for LR ratios / freezing; SR 'train: new' freezes all but the grown layers."""
    if stage.get("train") == "new" and new_params:
        for n, p in model.named_parameters():
            p.requires_grad_(n in new_params)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.encoder_groups() if hasattr(model, "encoder_groups") else [model]


class TaskData:
    """Training dataset, objective and validation for one stage."""

    def __init__(self, cfg: RunConfig, stage: dict, device: str):
        self.cfg, self.stage, self.device = cfg, stage, device
        uris = data.list_images(cfg.data, cfg.limit)
        if cfg.task == "sr":
            self.scale = stage.get("scale", 2)
            self.train = data.SrDataset(uris, self.scale, cfg.hr_crop, cfg.samples_per_image,
                                        DEGRADATIONS[cfg.degradations], cfg.seed)
            self.objective = SrObjective(cfg.loss, cfg.vgg_weights)
            val = data.list_images(cfg.val) if cfg.val else uris[: max(1, len(uris) // 10)]
            self.val_images = [data.read_rgb(u) for u in val]
        elif cfg.task == "seg":
            pairs = data.pair_segmentation(data.list_images(cfg.data) if cfg.limit is None else
                                           data.list_images(cfg.data)[: 2 * cfg.limit])
            train, val = data.grouped_split(pairs, cfg.val_fraction, seed=cfg.seed)
            size = stage.get("size", 128)
            self.train = data.SegDataset(train, size, augment=True, seed=cfg.seed)
            self.val = data.SegDataset(val or train[:1], size, augment=False, seed=cfg.seed)
            self.objective = SegObjective()
        else:
            self.train = data.CropDataset(uris, cfg.content_size, cfg.samples_per_image, cfg.seed)
            style = torch.from_numpy(data.read_rgb(cfg.style_image)).permute(2, 0, 1).float()[None] / 255
            self.objective = StyleObjective(style, cfg.vgg_weights, cfg.content_weight)
            val = data.list_images(cfg.val) if cfg.val else uris[:1]
            self.val = data.CropDataset(val, cfg.content_size, 1, cfg.seed + 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        was = model.training
        model.eval()
        try:
            if self.cfg.task == "sr":
                return self._eval_sr(model)
            if self.cfg.task == "seg":
                return self._eval_seg(model)
            return self._eval_style(model)
        finally:
            model.train(was)

    def _eval_sr(self, model) -> dict:
        s = self.scale
        bicubic = build("bicubic", scale=s)
        p, ss, pb = [], [], []
        for img in self.val_images:
            hr = metrics.mod_crop(img[:512, :512], s)
            lr = metrics.imresize(hr, 1 / s) if s > 1 else hr
            sr = predict_array(model.to(self.device), lr)
            p.append(metrics.psnr(sr, hr, s))
            ss.append(metrics.ssim(sr, hr, s))
            pb.append(metrics.psnr(predict_array(bicubic, lr), hr, s))
        return {"val_psnr": float(np.mean(p)), "val_ssim": float(np.mean(ss)), "val_psnr_bicubic": float(np.mean(pb)),
                "val_protocol": metrics.PROTOCOL_Y}

    def _eval_seg(self, model) -> dict:
        d, j, a = [], [], []
        for i in range(len(self.val)):
            img, mask = self.val[i]
            logits = model(img[None].to(self.device))[0, 0].float().cpu().numpy()
            m = mask[0].numpy() > 0.5
            d.append(metrics.dice(logits > 0, m))
            j.append(metrics.iou(logits > 0, m))
            a.append(metrics.pixel_accuracy(1 / (1 + np.exp(-logits)), m))
        return {"val_dice": float(np.mean(d)), "val_iou": float(np.mean(j)), "val_accuracy": float(np.mean(a))}

    def _eval_style(self, model) -> dict:
        terms = None
        for i in range(len(self.val)):
            (content,) = self.val[i]
            content = content[None].to(self.device)
            t = [x.item() for x in self.objective.loss(model(content), content, sum_layers=False)]
            terms = t if terms is None else [a + b for a, b in zip(terms, t)]
        terms = [t / len(self.val) for t in terms]
        return {"val_loss": sum(terms), **{f"val_{n}": v for n, v in zip(self.objective.loss.names, terms)}}
