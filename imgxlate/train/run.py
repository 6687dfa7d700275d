"""One command runs a whole training plan: Ray Train fit -> model artifact -> metrics and curves."""

from __future__ import annotations

import json
import logging
import os
import sys

from imgxlate import plots
from imgxlate.io import storage
from imgxlate.train import ray_train, tasks


def _log(msg: str) -> None:
    print(f"[imgxlate] {msg}", file=sys.stderr, flush=True)


def parse_stages(task: str, text: str | None) -> list[dict]:
    """'2:3,4:1:new,4:2' (SR scale:epochs[:new]) or '128:2:frozen,128:2,256:2' (seg size:epochs[:frozen]).

    A seg stage after a frozen one trains everything with discriminative LRs (encoder x0.1) and the
    encoder's batch norm frozen, as the lesson does after unfreezing."""
    if not text:
        return []
    stages, saw_frozen = [], False
    for item in text.split(","):
        parts = item.strip().split(":")
        value, epochs = int(parts[0].lstrip("x")), int(parts[1])
        flag = parts[2] if len(parts) > 2 else ""
        if task == "sr":
            s = {"scale": value, "epochs": epochs}
            if flag == "new":
                s["train"] = "new"
        elif task == "seg":
            s = {"size": value, "epochs": epochs}
            if flag == "frozen":
                s["frozen_groups"], saw_frozen = [0], True
            elif saw_frozen:
                s.update({"lr_ratios": [0.1, 1.0], "bn_freeze": True})
        else:
            s = {"epochs": epochs}
        stages.append(s)
    return stages


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")             # set inside `ray job submit`
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def train(cfg: tasks.RunConfig, ray_address: str | None = None) -> dict:
    cfg = tasks.absolute_paths(cfg)
    start_ray(ray_address, num_cpus=max(2, cfg.workers * int(cfg.cpus_per_worker)))
    _log(f"training {cfg.task} run '{cfg.name}' on {cfg.workers} workers "
         f"(global batch {cfg.batch_size * cfg.workers}); checkpoints in {ray_train.run_dir(cfg)}")
    result = ray_train.fit(cfg)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    out = ray_train.export_artifact(cfg, result)
    history = []
    try:
        text = storage.read_bytes(storage.join(ray_train.run_dir(cfg), "imgxlate", "metrics.jsonl")).decode()
        history = [json.loads(line) for line in text.splitlines() if line.strip()]
    except FileNotFoundError:
        pass
    curves = storage.join(ray_train.run_dir(cfg), "imgxlate", "curves.png")
    if history:
        storage.write_bytes(curves, plots.training_curves(history, f"{cfg.task} run {cfg.name}"))
    last = history[-1] if history else {}
    _log(f"model artifact: {out}; curves: {curves}")
    _log("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()
                                      if isinstance(v, float) and (k.startswith("val_") or k == "train_loss")))
    return {"artifact": out, "curves": curves, "history": history, "metrics": result.metrics}
