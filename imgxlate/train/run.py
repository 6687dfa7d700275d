"""One command runs a whole training plan: Ray Train fit -> model artifact -> metrics and curves."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import time

from imgxlate import plots, rayenv
from imgxlate.errors import Stopped
from imgxlate.io import storage
from imgxlate.log import log
from imgxlate.models import build, make_config
from imgxlate.train import ray_train, tasks


def parse_stages(task: str, text: str | None) -> list[tasks.Stage]:
    """The stage plan from its command-line form: '2:3,4:1:new,4:2' (SR scale:epochs[:new]) or
    '128:2:frozen,128:2,256:2' (seg size:epochs[:frozen]); each item made a Stage by the task's parse_stage.
    tasks.DataError for an item that is not of the task's form."""
    t, stages = tasks.TASKS[task], []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        parts = item.strip().split(":")
        flag = parts[2] if len(parts) > 2 else ""
        try:
            value, epochs = int(parts[0].lstrip("x")), int(parts[1])
        except (ValueError, IndexError):
            value = epochs = 0
        if min(value, epochs) < 1 or len(parts) > 3 or flag not in t.stage_flags:
            raise tasks.DataError(f"--stages {text!r}: {item.strip()!r} is not {t.stage_form} (whole numbers of "
                                  f"at least 1)")
        stages.append(t.parse_stage(value, epochs, flag, any(s.frozen_groups for s in stages)))
    scales = [s.scale for s in stages if s.scale]
    if any(b < a for a, b in zip(scales, scales[1:])):      # else stage 1 trains, then growing it fails
        raise tasks.DataError(f"--stages {text!r}: the scale goes down (x{' -> x'.join(map(str, scales))}); a model "
                              f"grows to larger scales only")
    return stages


def ray_log_path(cfg: tasks.RunConfig) -> str:
    """Where Ray's own messages of a run go: <storage>/<name>/imgxlate/ray.log, or a local temporary file
    when the storage is remote (a log is appended to as it is written)."""
    if storage.is_local(cfg.storage):
        folder = os.path.join(ray_train.run_dir(cfg), "imgxlate")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, "ray.log")
    return os.path.join(tempfile.gettempdir(), f"imgxlate-{cfg.name}-ray.log")


def check_data(cfg: tasks.RunConfig, resuming: bool = False) -> tuple[str, object] | None:
    """The stages' data plans, checked on the driver before any worker starts: warnings are printed once
    here, and a plan with nothing to train on stops the run with tasks.DataError. Returns the architecture
    and config of the run's first model (see check_resume); None for a resumed --init run, whose model comes
    from its checkpoint: its --init is not read, so an artifact gone since does not stop it."""
    from imgxlate.train.warmstart import check_options

    task = tasks.task_of(cfg)
    first = task.stages(cfg)[0]
    built = None
    check_options(cfg)              # resumed or not: --init takes no --preset / --arch
    if cfg.init and not resuming:   # its first model built once here: a bad --init (or a config or scale it
        try:                        # cannot take) stops before any worker
            model = task.build_model(cfg, first, None)[0]
            built = model.arch, model.config
        except ValueError as e:
            raise e if isinstance(e, tasks.DataError) else tasks.DataError(f"--init {cfg.init}: {e}") from None
    elif not cfg.init:
        try:
            built = task.fresh_config(cfg, first)
            build(*built)               # built once here (no weights read): a value it cannot take ('{"nf": "64"}')
        except tasks.DataError:
            raise
        except Exception as e:          # stops before Ray, not in every worker and its retries
            raise tasks.DataError(f"the model cannot be built from this --preset / --model-config / --scale: "
                                  f"{type(e).__name__}: {e}") from None
    plans = task.check(cfg)
    for warning in dict.fromkeys(w for p in plans for w in p.warnings):
        log(f"warning: {warning}")
    plan = plans[0]
    log(f"data: {len(plan.train)} training images" + (f", {len(plan.val)} held out for validation "
                                                      f"(seed {cfg.seed}), never trained on" if plan.held_out
                                                      else f", {len(plan.val)} for validation"))
    return built


def resume_point(cfg: tasks.RunConfig) -> dict | None:
    """What the checkpoint a rerun resumes from holds (ray_train.latest_saved); None for a fresh run, or, with a
    warning, when it cannot be read (the workers say why, if they cannot read it either)."""
    try:
        return ray_train.latest_saved(cfg)
    except Exception as e:
        log(f"warning: the run's checkpoint cannot be read ({type(e).__name__}: {e}); its model is not compared")
        return None


def check_resume(cfg: tasks.RunConfig, first: tuple[str, object] | None, saved: dict | None) -> None:
    """A rerun (same --name and --storage) resumes the checkpoint ``saved`` (resume_point), whose model is what
    the run built, so a command that would build another one (``first``: the architecture and config check_data
    returns, grown to the checkpoint's stage; for --init, the trained model's config with --model-config's
    fields) stops with tasks.DataError naming each difference, instead of resuming the old model as if it were
    the new one. Where the starting weights came from (a U-Net's ``encoder_weights``; which ``--init``) is not
    compared: resuming reads neither."""
    if saved is None:
        return
    stages, si = tasks.task_of(cfg).stages(cfg), saved["stage"]
    again = "resume with the run's own options, or start another run with a new --name"
    if si >= len(stages):
        raise tasks.DataError(f"run '{cfg.name}' in {cfg.storage} is in stage {si + 1}; this command plans "
                              f"{len(stages)}: {again}")
    try:                                            # a config saved before a field existed: its default
        have = {"arch": saved["arch"], **dataclasses.asdict(make_config(saved["arch"], saved["model_config"]))}
    except (KeyError, TypeError, ValueError) as e:
        raise tasks.DataError(f"run '{cfg.name}' in {cfg.storage} holds a {saved['arch']} model this version of "
                              f"imgxlate cannot build ({e}): resume it with the version that wrote it, or start "
                              f"another run with a new --name") from None
    want = ({"arch": first[0], **dataclasses.asdict(first[1])} if first else
            {**have, **{k: v for k, v in cfg.model.items() if k != "scale"}})    # --init: the fields asked for
    if stages[si].scale and "scale" in want:        # SR: progressive resizing grows the first model's scale
        want["scale"] = stages[si].scale
    if differ := [k for k in dict.fromkeys([*want, *have])
                  if k != "encoder_weights" and _plain(want.get(k)) != _plain(have.get(k))]:
        def said(c: dict) -> str:
            return ", ".join(f"{k} {json.dumps(c.get(k))}" for k in differ)
        raise tasks.DataError(f"run '{cfg.name}' in {cfg.storage} resumes a model with {said(have)} (stage "
                              f"{si + 1}); this command asks for {said(want)}, which resuming would ignore: {again}")


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def train(cfg: tasks.RunConfig, ray_address: str | None = None, wait_for_resources: float = 0) -> dict:
    """Check the data, then the cluster's resources (ray_train.ResourceError when it cannot hold the
    workers, after waiting up to ``wait_for_resources`` seconds for an autoscaler), train, export. Ray's
    own output goes to a log file named on the console; a Ray started here is shut down at the end."""
    cfg = tasks.absolute_paths(cfg)
    saved = resume_point(cfg)
    first = check_data(cfg, resuming=saved is not None)
    check_resume(cfg, first, saved)
    with hold(cfg):
        now = saved
        with contextlib.suppress(Exception):        # unreadable: said once above (or Ray's workers will say so)
            now = ray_train.latest_saved(cfg)
        if now != saved:                            # another training saved meanwhile: check what Ray resumes
            check_resume(cfg, first, now)
        return _train(cfg, ray_address, wait_for_resources)


@contextlib.contextmanager
def hold(cfg: tasks.RunConfig):
    """The run's lease (<storage>/<name>/imgxlate/LEASE, imgxlate.io.lease) for the block: a second training of
    the same run (a command started twice, a Ray job resubmitted while the first driver lives) stops with
    tasks.DataError instead of writing the same checkpoints. A killed driver's lease expires within two minutes
    (at once on its own machine)."""
    from imgxlate.io.lease import Lease, LeaseHeld, LeaseUnsafe

    lease = None
    try:
        lease = Lease(ray_train.run_dir(cfg), cfg.name, folder="imgxlate").acquire()
    except LeaseHeld as e:
        h, now = e.holder, time.time()
        raise tasks.DataError(f"run '{cfg.name}' in {cfg.storage} is being trained by another process (pid "
                              f"{h.get('pid')} on {h.get('host')}, its lease renewed {now - h.get('heartbeat', 0):.0f} "
                              f"s ago): two trainings of one run would overwrite each other's checkpoints. Wait for "
                              f"it to end, or give a new --name; if that process was killed, its lease expires in "
                              f"{max(0, h.get('expires', 0) - now):.0f} s") from None
    except LeaseUnsafe as e:
        log(f"warning: the store behind {cfg.storage} does not enforce conditional writes ({e.answer}), so no lease "
            f"keeps two trainings of run '{cfg.name}' apart: never start two")
    except Exception as e:                  # a read-only or full disk, a store that refuses the write
        raise tasks.DataError(f"run '{cfg.name}': its lease cannot be written in {cfg.storage} "
                              f"({type(e).__name__}: {e})") from None
    try:
        yield
    finally:
        if lease is not None:
            lease.release()
            if lease.lost:                  # taken over (by a run that judged this one dead) or not renewed
                log(f"warning: run '{cfg.name}' lost its lease while it trained: another training of it may have "
                    f"written its checkpoints too; check its metrics before trusting the model")


def _train(cfg: tasks.RunConfig, ray_address: str | None, wait_for_resources: float) -> dict:
    import ray

    want = max(2, math.ceil(cfg.workers * cfg.cpus_per_worker - 1e-9))     # 2 x 1.5 CPUs: 3, not 2
    if not rayenv.cluster_address(ray_address) and not ray.is_initialized() and want > (os.cpu_count() or 1):
        log(f"warning: {cfg.workers} workers of {cfg.cpus_per_worker:g} CPUs ask for {want} CPUs and this machine "
            f"has {os.cpu_count()}: they share its CPUs, each step taking longer")
    started = rayenv.start_or_join(ray_address, num_cpus=want)
    log_path = ray_log_path(cfg)
    log(f"Ray's own messages: {log_path}")
    try:
        with rayenv.output_to(log_path):
            if storage.is_local(cfg.storage):   # checkpoints written on one node are read on another
                rayenv.check_shared(ray_train.run_dir(cfg), "--storage")
            storage.remove(ray_train.diverged_uri(cfg))     # an earlier run's, left by a driver that died
            ray_train.check_resources(cfg, wait_for_resources, log=log)
            if cfg.use_gpu:
                ray_train.check_cuda(cfg)
            log(f"training {cfg.task} run '{cfg.name}' on {cfg.workers} workers "
                f"(global batch {cfg.batch_size * cfg.workers}); checkpoints in {ray_train.run_dir(cfg)}")
            try:
                result = ray_train.fit(cfg)
            except SystemExit as e:     # only Ray's signal handlers exit from in here: Train's on Ctrl-C aborts
                term = e.code == signal.SIGTERM     # the run, then exits 0 (or 1, by timing); ray.init's on SIGTERM
                raise Stopped(f"training run '{cfg.name}' interrupted ({'SIGTERM' if term else 'a signal'})", 0,
                              128 + (signal.SIGTERM if term else signal.SIGINT),       # exits with its number
                              advice="rerun the same command to resume from its last checkpoint") from None
            if started:
                ray.shutdown()                  # while Ray's output still goes to the log
                started = False
    finally:
        if started:
            ray.shutdown()
    if result.error:
        raise RuntimeError(f"training failed: {result.error} (Ray's messages: {log_path})")
    if storage.exists(why := ray_train.diverged_uri(cfg)):        # (removed at the start of every run too)
        what = storage.read_bytes(why).decode()
        storage.remove(why)                     # a rerun of the run (after a lower --lr, say) starts clean
        raise ray_train.Diverged(cfg, what)
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
