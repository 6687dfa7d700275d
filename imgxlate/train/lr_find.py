"""The LR finder (Smith 2015, as in fastai): train for a few steps while the learning rate grows
exponentially, record the smoothed loss, stop when it diverges, suggest the rate of steepest descent."""

from __future__ import annotations

import math

import numpy as np
import torch


def lr_find(model, objective, loader, start_lr: float = 1e-6, end_lr: float = 1.0, steps: int = 60,
            beta: float = 0.9, device: str = "cpu") -> tuple[list[float], list[float], float]:
    """Returns (lrs, smoothed losses, suggested lr). The model's weights are restored afterwards."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=start_lr)
    gamma = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    it = iter(loader)
    for i in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        lr = start_lr * gamma**i
        for g in opt.param_groups:
            g["lr"] = lr
        loss, _ = objective(model, [b.to(device) for b in batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = beta * avg + (1 - beta) * loss.item()
        smooth = avg / (1 - beta ** (i + 1))
        if not math.isfinite(smooth) or smooth > 4 * best:
            break
        best = min(best, smooth)
        lrs.append(lr)
        losses.append(smooth)
    model.load_state_dict(saved)
    if len(losses) < 3:
        return lrs, losses, lrs[0] if lrs else start_lr
    grads = np.gradient(np.array(losses), np.log(np.array(lrs)))
    cut = max(1, len(grads) // 10)              # ignore the noisy first steps
    suggestion = float(lrs[cut + int(np.argmin(grads[cut:]))])
    return lrs, losses, suggestion
