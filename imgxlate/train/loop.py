"""The training loop: plain PyTorch, no Ray. Ray Train glue lives in ray_train.py.

AdamW, one-cycle schedule (its warmup is the large-batch warmup of Goyal et al. 2017), weight decay,
gradient clipping, bf16 autocast (on GPUs, and on CPUs that run bf16 natively), fp16 with a grad scaler on
GPUs, optional EMA weights, discriminative learning rates per layer group, freezing by group, the lesson's bn_freeze.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class LoopConfig:
    epochs: int = 1
    lr: float = 1e-3                   # per `reference_batch` samples; scaled linearly with the global batch
    reference_batch: int = 16
    weight_decay: float = 1e-4
    warmup_pct: float = 0.25           # one-cycle warmup fraction
    clip_grad: float = 1.0             # max gradient norm (0: off)
    amp: str = "bf16"                  # autocast: 'bf16' (GPU, or a CPU with native bf16; else fp32), 'fp16'
                                       # (GPU only, with a grad scaler) or 'off'
    ema: float = 0.0                   # EMA decay of the weights (0: off), e.g. 0.999
    lr_ratios: tuple[float, ...] = ()  # discriminative LRs: one factor per layer group (e.g. (0.01, 1))
    frozen_groups: tuple[int, ...] = ()  # layer groups not trained
    bn_freeze: bool = False            # also fix batch-norm statistics in groups with an LR ratio < 1 (frozen
                                       # groups' are always fixed)
    checkpoint_every: int = 0          # also checkpoint every N steps (0: only per epoch)
    max_steps_per_epoch: int = 0       # cap (0: the whole loader)


SYNC_EVERY = 50      # steps between checks that the loss is finite (each waits for the device)


def cpu_autocast() -> bool:
    """bf16 autocast on this CPU: only where it runs bf16 natively (AMX or AVX-512 BF16: 2.2x a training
    step of the sr-x2 model here); elsewhere bf16 is emulated and slower than fp32."""
    from imgxlate.infer.precision import cpu_bf16_native
    return cpu_bf16_native() is not None


def scaled_lr(cfg: LoopConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr grows with the global batch."""
    return cfg.lr * global_batch / cfg.reference_batch


def param_groups(groups: list[nn.Module], cfg: LoopConfig, lr: float) -> list[dict]:
    ratios = cfg.lr_ratios or (1.0,) * len(groups)
    out = []
    for i, (g, r) in enumerate(zip(groups, ratios)):
        params = [p for p in g.parameters() if p.requires_grad]
        if i in cfg.frozen_groups or not params:
            for p in g.parameters():
                p.requires_grad_(False)
            continue
        out.append({"params": params, "lr": lr * r})
    return out


def set_bn_eval(modules: list[nn.Module]) -> None:
    for g in modules:
        for m in g.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


class Trainer:
    """Runs epochs of ``objective(model, batch)``; calls ``on_checkpoint(trainer, metrics)`` after every
    epoch (and every ``checkpoint_every`` steps) and ``evaluate(model)`` at epoch ends."""

    def __init__(self, model: nn.Module, objective: nn.Module, loader, cfg: LoopConfig, *,
                 groups: list[nn.Module] | None = None, global_batch: int | None = None, device: str = "cpu",
                 evaluate: Callable[[nn.Module], dict] | None = None,
                 on_checkpoint: Callable[[Trainer, dict], None] | None = None, set_epoch=None):
        self.model, self.objective, self.loader, self.cfg = model, objective.to(device), loader, cfg
        self.device, self.evaluate, self.on_checkpoint, self.set_epoch = device, evaluate, on_checkpoint, set_epoch
        self.groups = groups or [model]
        lr = scaled_lr(cfg, global_batch or getattr(loader, "batch_size", cfg.reference_batch))
        self.optimizer = torch.optim.AdamW(param_groups(self.groups, cfg, lr), weight_decay=cfg.weight_decay)
        self.steps_per_epoch = min(len(loader), cfg.max_steps_per_epoch or len(loader))
        total = max(1, cfg.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=[g["lr"] for g in self.optimizer.param_groups],
            total_steps=total, pct_start=_one_cycle_pct(cfg.warmup_pct, total))
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda") and cfg.amp == "fp16")
        self.ema = copy.deepcopy(_unwrap(model)).eval() if cfg.ema else None
        self.step = 0
        self.epoch = 0
        self.epoch_step = 0                    # steps done in the current epoch (for mid-epoch resume)
        self.history: list[dict] = []

    def _autocast(self):
        if self.device.startswith("cuda") and self.cfg.amp in ("bf16", "fp16"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16)
        if self.cfg.amp == "bf16" and cpu_autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _train_mode(self):
        """Train mode, except batch norm in frozen groups, which always keeps its statistics (as fastai
        does: a frozen group is not trained, its running means included), and, with ``bn_freeze``, in the
        groups trained at a reduced LR (the lesson's pretrained encoder after unfreezing)."""
        self.model.train()
        set_bn_eval([g for i, g in enumerate(self.groups) if i in self.cfg.frozen_groups or
                     (self.cfg.bn_freeze and self.cfg.lr_ratios and self.cfg.lr_ratios[i] < 1)])

    @torch.no_grad()
    def _update_ema(self):
        d = self.cfg.ema
        for e, p in zip(self.ema.state_dict().values(), _unwrap(self.model).state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(p.detach(), alpha=1 - d)
            else:
                e.copy_(p)

    def train_step(self, batch) -> dict:
        batch = [b.to(self.device, non_blocking=True) for b in batch]
        with self._autocast():
            loss, logs = self.objective(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.clip_grad).detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return logs

    def _check_finite(self, sums: dict, since: int) -> None:
        """The loss summed since the last check is finite, or FloatingPointError. Checked every SYNC_EVERY steps
        and at every epoch's end, not at every step: each check waits for the device (a host sync)."""
        if "loss" not in sums:
            return
        loss = torch.as_tensor(sums["loss"]).detach().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            loss = loss.clone()                 # every worker sums every worker's loss, so all of them stop at once
            torch.distributed.all_reduce(loss)
        if not math.isfinite(total := float(loss)):
            raise FloatingPointError(f"loss became {total} between steps {since + 1} and {self.step}")

    def fit(self) -> list[dict]:
        while self.epoch < self.cfg.epochs:
            if self.set_epoch:
                self.set_epoch(self.epoch)
            self._train_mode()
            t0, sums, n, checked = time.time(), {}, 0, self.step
            skip, self.epoch_step = self.epoch_step, 0
            for i, batch in enumerate(self.loader):
                if i >= self.steps_per_epoch:
                    break
                if i < skip:                   # resumed mid-epoch: these batches were trained on
                    self.epoch_step += 1
                    continue
                logs = self.train_step(batch)
                self.epoch_step += 1
                for k, v in logs.items():               # summed on the device: no host sync per step
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                if self.step % SYNC_EVERY == 0:
                    self._check_finite(sums, checked)
                    checked = self.step
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.on_checkpoint:
                    self._check_finite(sums, checked)
                    self.on_checkpoint(self, {"step": self.step, "epoch": self.epoch,
                                              "train_loss": float(sums["loss"]) / n, "partial_epoch": True})
            self._check_finite(sums, checked)
            self.epoch += 1
            self.epoch_step = 0
            metrics = {"epoch": self.epoch, "step": self.step, "epoch_time_s": time.time() - t0,
                       "lr": self.scheduler.get_last_lr()[-1],
                       **{f"train_{k}": float(v) / max(n, 1) for k, v in sums.items()}}
            if self.evaluate:
                metrics.update(self.evaluate(self.ema if self.ema is not None else _unwrap(self.model)))
            self.history.append(metrics)
            if self.on_checkpoint:
                self.on_checkpoint(self, metrics)
        return self.history

    def state_dict(self) -> dict:
        return {"model": _unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng_state(),
                "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step, "history": self.history}

    def load_state_dict(self, s: dict) -> None:
        _unwrap(self.model).load_state_dict(s["model"])
        fresh = [dict(g) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(s["optimizer"])
        for g, f in zip(self.optimizer.param_groups, fresh):     # a rerun's --lr / --weight-decay are the run's from
            if g.get("max_lr") and f.get("max_lr"):               # here on: the one-cycle curve is linear in max_lr
                g["lr"] *= f["max_lr"] / g["max_lr"]
            g.update({k: f[k] for k in ("max_lr", "initial_lr", "min_lr", "weight_decay") if k in f})
        if s["scheduler"]["total_steps"] == self.scheduler.total_steps:
            self.scheduler.load_state_dict(s["scheduler"])
        else:                                  # a finished run extended with more epochs: stretch the cycle
            self.scheduler.last_epoch = s["step"]
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s.get("ema"):
            self.ema.load_state_dict(s["ema"])
        set_rng_state(s["rng"])
        self.step, self.epoch, self.history = s["step"], s["epoch"], list(s["history"])
        self.epoch_step = s.get("epoch_step", 0)


def _one_cycle_pct(pct: float, total_steps: int) -> float:
    """OneCycleLR divides by its warmup's last step index, pct * total - 1, and by the steps after it:
    a warmup of exactly one step (4 steps at 25%) or of every step would divide by zero."""
    if total_steps * pct in (1, total_steps):
        return pct * (1 - 1e-3)
    return pct


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
