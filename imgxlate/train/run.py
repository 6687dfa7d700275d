"""One command runs a whole training plan: Ray Train fit -> model artifact -> metrics and curves."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from imgxlate import plots, rayenv
from imgxlate.io import storage
from imgxlate.log import log
from imgxlate.train import ray_train, tasks


def parse_stages(task: str, text: str | None) -> list[tasks.Stage]:
    """The stage plan from its command-line form (see :meth:`imgxlate.train.tasks.Task.parse_stages`)."""
    return tasks.TASKS[task].parse_stages(text)


def ray_log_path(cfg: tasks.RunConfig) -> str:
    """Where Ray's own messages of a run go: <storage>/<name>/imgxlate/ray.log, or a local temporary file
    when the storage is remote (a log is appended to as it is written)."""
    if storage.is_local(cfg.storage):
        folder = os.path.join(ray_train.run_dir(cfg), "imgxlate")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, "ray.log")
    return os.path.join(tempfile.gettempdir(), f"imgxlate-{cfg.name}-ray.log")


def check_data(cfg: tasks.RunConfig) -> dict:
    """The stages' data plans, checked on the driver before any worker starts: warnings are printed once
    here, and a plan with nothing to train on stops the run with tasks.DataError. Returns what fixes the
    run's first model (see check_same_model)."""
    task = tasks.task_of(cfg)
    first = task.stages(cfg)[0]
    if cfg.init:            # its first model built once here: a bad --init (or a config or scale it cannot take)
        try:                # stops before any worker
            model = task.build_model(cfg, first, None)[0]
        except ValueError as e:
            raise e if isinstance(e, tasks.DataError) else tasks.DataError(f"--init {cfg.init}: {e}") from None
        arch, config = model.arch, model.config
    else:
        try:
            arch, config = task.fresh_config(cfg, first)
        except (KeyError, TypeError, ValueError) as e:
            raise tasks.DataError(f"the model: {e}") from None
    plans = task.check(cfg)
    for warning in dict.fromkeys(w for p in plans for w in p.warnings):
        log(f"warning: {warning}")
    plan = plans[0]
    log(f"data: {len(plan.train)} training images" + (f", {len(plan.val)} held out for validation "
                                                      f"(seed {cfg.seed}), never trained on" if plan.held_out
                                                      else f", {len(plan.val)} for validation"))
    return json.loads(json.dumps({"task": cfg.task, "init": cfg.init, "arch": arch,
                                  "config": dataclasses.asdict(config)}))


def check_same_model(cfg: tasks.RunConfig, model: dict) -> None:
    """A rerun (same --name and --storage) resumes the run's checkpoints, whose model is the one the run
    started with, so options that would build another first model (``model``: its task, --init, architecture
    and config, from check_data) stop it with tasks.DataError instead of being ignored. They are recorded in
    <storage>/<name>/imgxlate/run.json while the run has no checkpoint (until then it may still change them)."""
    uri = storage.join(ray_train.run_dir(cfg), "imgxlate", "run.json")
    try:
        theirs = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        theirs = None
    except ValueError:                  # not JSON, or not UTF-8
        theirs = "unreadable"
    if theirs is not None and not isinstance(theirs, dict):
        log(f"warning: {uri} is not what imgxlate wrote; the run's model is recorded again, uncompared")
        theirs = None
    if theirs is not None and ray_train.has_checkpoint(cfg):
        if differ := _differences(theirs, model):
            raise tasks.DataError(f"run '{cfg.name}' in {cfg.storage} has checkpoints of the model it started with "
                                  f"({', '.join(f'{k} {v}' for k, v, _ in differ)}); this command asks for "
                                  f"{', '.join(f'{k} {v}' for k, _, v in differ)}, which resuming would ignore: "
                                  f"resume with the run's own options, or start another run with a new --name")
        return
    storage.write_bytes(uri, json.dumps(model, indent=1).encode())


def _differences(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """(name, old value, new value) of each setting that differs; a config's fields one by one."""
    said = []
    for k in dict.fromkeys([*old, *new]):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            said += [(f"{k}.{f}", json.dumps(a.get(f)), json.dumps(b.get(f))) for f in dict.fromkeys([*a, *b])
                     if a.get(f) != b.get(f)]
        elif a != b:
            said.append((k, json.dumps(a), json.dumps(b)))
    return said


def train(cfg: tasks.RunConfig, ray_address: str | None = None, wait_for_resources: float = 0) -> dict:
    """Check the data, then the cluster's resources (ray_train.ResourceError when it cannot hold the
    workers, after waiting up to ``wait_for_resources`` seconds for an autoscaler), train, export. Ray's
    own output goes to a log file named on the console; a Ray started here is shut down at the end."""
    import ray

    cfg = tasks.absolute_paths(cfg)
    check_same_model(cfg, check_data(cfg))
    started = rayenv.start_or_join(ray_address, num_cpus=max(2, cfg.workers * int(cfg.cpus_per_worker)))
    log_path = ray_log_path(cfg)
    log(f"Ray's own messages: {log_path}")
    try:
        with rayenv.output_to(log_path):
            ray_train.check_resources(cfg, wait_for_resources, log=log)
            log(f"training {cfg.task} run '{cfg.name}' on {cfg.workers} workers "
                f"(global batch {cfg.batch_size * cfg.workers}); checkpoints in {ray_train.run_dir(cfg)}")
            result = ray_train.fit(cfg)
            if started:
                ray.shutdown()                  # while Ray's output still goes to the log
                started = False
    finally:
        if started:
            ray.shutdown()
    if result.error:
        raise RuntimeError(f"training failed: {result.error} (Ray's messages: {log_path})")
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
    log(f"model artifact: {out}; curves: {curves}")
    log("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()
                                     if isinstance(v, float) and (k.startswith("val_") or k == "train_loss")))
    return {"artifact": out, "curves": curves, "history": history, "metrics": result.metrics}
