"""Ray Train glue: the only training module that imports Ray. Lines marked `# ray:` are what Ray adds.

Each worker runs :func:`train_loop_per_worker`: it builds the stage's model and data, shards the data
with a DistributedSampler, wraps the model in DDP (gloo on CPUs, NCCL on GPUs), trains with the
plain-PyTorch :class:`~imgxlate.train.loop.Trainer` and reports a checkpoint (model, optimiser,
scheduler, scaler, EMA, RNG state, stage) every epoch and every N steps. A rerun with the same name
and storage resumes from the latest checkpoint; a killed worker is recovered up to max_failures.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import resource
import subprocess
import tempfile
import time

import ray.train  # ray:
import ray.train.torch  # ray:
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from imgxlate.errors import CannotRun, Stopped
from imgxlate.io import storage
from imgxlate.train import tasks
from imgxlate.train.data import EpochSampler, split_cache
from imgxlate.train.loop import Trainer

CKPT = "state.pt"
META = "meta.json"                  # beside it: what the checkpoint holds, read without loading it


@dataclasses.dataclass(frozen=True)
class _Worker:
    """Where this Train worker runs: its rank among ``world`` workers, and its torch device."""
    rank: int
    world: int
    device: str


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: resume from the run's latest checkpoint, if any, then train every stage left."""
    cfg = tasks.RunConfig.from_dict(config)
    task = tasks.task_of(cfg)
    worker = _join(cfg)
    stages = task.stages(cfg)
    start_stage, state, model, new = _resume(cfg, stages, worker.rank)
    for si in range(start_stage, len(stages)):
        resuming = state is not None
        if not resuming:
            model, new = task.build_model(cfg, stages[si], model)
        trainer = _stage_trainer(cfg, task, stages, si, model, new, worker)
        if resuming:
            trainer.load_state_dict(state)
        try:
            trainer.fit()
        except FloatingPointError as e:         # on every worker at once (Trainer._check_finite); raised, Ray would
            if worker.rank == 0:                # retry from the same checkpoint, and diverge again
                storage.write_bytes(diverged_uri(cfg), f"stage {si + 1}: {e}".encode())
            return
        state = None


def diverged_uri(cfg: tasks.RunConfig) -> str:
    """Where rank 0 says why the loss stopped being finite, for the driver (which removes it once read)."""
    return storage.join(run_dir(cfg), "imgxlate", "diverged.txt")


class Diverged(Stopped):
    """The training's loss (or its final weights) stopped being finite: no artifact is written (exit 1)."""

    def __init__(self, cfg: tasks.RunConfig, what: str, finished: bool = False):
        lower = f"lower --lr (now {cfg.loop.lr:g}; `imgxlate lr-find` suggests one)"
        super().__init__(f"training diverged: {what}", 0, 1, advice=(
            f"{lower} and start afresh with another --name (this run's last checkpoint holds them)" if finished else
            f"{lower} and rerun: the run resumes from its last checkpoint at the new LR (or give another --name "
            f"to start afresh)"))


def _join(cfg: tasks.RunConfig) -> _Worker:
    """This worker's place in the run; torch seeded, and on CPUs one thread per CPU the worker holds."""
    ctx = ray.train.get_context()                                        # ray:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()             # ray:
    device = str(ray.train.torch.get_device()) if cfg.use_gpu else "cpu"  # ray:
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    return _Worker(rank, world, device)


def _resume(cfg: tasks.RunConfig, stages: list, rank: int) -> tuple[int, dict | None, torch.nn.Module | None, list]:
    """(first stage to train, the trainer state to resume it from or None, the model so far or None, the
    names of its new parameters) from the run's latest checkpoint; (0, None, None, []) on a fresh run."""
    ckpt = ray.train.get_checkpoint()                                    # ray: latest checkpoint, if any
    if not ckpt:
        return 0, None, None, []
    saved = read_checkpoint(ckpt)
    start_stage, state, new = saved["stage"], saved["trainer"], saved.get("new_params", [])
    from imgxlate.models import build

    model = build(saved["arch"], saved["model_config"])
    model.load_state_dict(state["model"])
    # A stage is done when its epochs (as configured now: a rerun may extend them) are done.
    if state["epoch"] >= tasks.stage_loop(cfg, stages[start_stage]).epochs and not state.get("epoch_step"):
        start_stage, state, new = start_stage + 1, None, []
    if rank == 0:
        print(f"[imgxlate] resuming run '{cfg.name}' from its latest checkpoint: stage {saved['stage']}, "
              f"epoch {saved['trainer']['epoch']}, step {saved['trainer']['step']}", flush=True)
    return start_stage, state, model, new


def _stage_trainer(cfg: tasks.RunConfig, task, stages: list, si: int, model, new: list, worker: _Worker) -> Trainer:
    """The plain-PyTorch Trainer of stage ``si`` on this worker: its share of the data (DistributedSampler),
    the model in DDP, and a checkpoint reported to Ray Train at each of the loop's checkpoints."""
    stage = stages[si]
    groups = tasks.trainable_groups(model, stage, new)
    td = task.stage_data(cfg, stage, worker.device)
    sampler = DistributedSampler(td.train, num_replicas=worker.world, rank=worker.rank, shuffle=True, seed=cfg.seed)
    options = loader_options(cfg, worker.device)
    epochs = EpochSampler(sampler)
    loader = DataLoader(td.train, batch_size=cfg.batch_size, sampler=epochs if options["num_workers"] else sampler,
                        drop_last=len(td.train) >= cfg.batch_size * worker.world, **options)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=worker.device,  # ray: DDP + device
                                              parallel_strategy_kwargs={"find_unused_parameters": bool(new) or
                                                                        stage.train == "new"})

    def set_epoch(e):
        sampler.set_epoch(e)
        epochs.set_epoch(e)
        td.train.set_epoch(e)

    return Trainer(ddp_model, td.objective, loader, tasks.stage_loop(cfg, stage), groups=groups,
                   global_batch=cfg.batch_size * worker.world, device=worker.device,
                   evaluate=functools.partial(td.evaluate, share=(worker.rank, worker.world)),
                   on_checkpoint=_reporter(cfg, stages, si, model, new, td, worker.rank), set_epoch=set_epoch)


def loader_options(cfg: tasks.RunConfig, device: str) -> dict:
    """DataLoader settings: a GPU worker decodes and crops in ``cpus_per_worker - 1`` loader processes (its main
    process feeds the GPU) into pinned memory, so the copy overlaps the step; a CPU worker loads in its own
    process, whose CPUs compute the model (a loader process would take them from it). Loader processes live across
    epochs, keeping their caches (each a share of --cache-mb, data.split_cache); the epoch that seeds the crops
    reaches them with each index (data.EpochSampler)."""
    if not device.startswith("cuda"):
        return {"num_workers": 0}
    n = max(0, int(cfg.cpus_per_worker) - 1)
    if not n:
        return {"num_workers": 0, "pin_memory": True}
    return {"num_workers": n, "pin_memory": True, "prefetch_factor": 4, "persistent_workers": True,
            "worker_init_fn": split_cache}


def _reporter(cfg: tasks.RunConfig, stages: list, si: int, model, new: list, td, rank: int):
    """The loop's on_checkpoint for stage ``si``: every rank reports its metrics (with every rank's peak RSS)
    to Ray Train, rank 0 with the checkpoint; rank 0 then appends the epoch to metrics.jsonl and prints it."""
    stage = stages[si]

    def on_checkpoint(trainer: Trainer, metrics: dict) -> None:
        done = trainer.epoch >= trainer.cfg.epochs and not metrics.get("partial_epoch")
        rss = _gather(_peak_rss_mb())                                # every rank calls this together
        metrics = {**metrics, "stage": si, "stage_done": done, "global_step": trainer.step, **td.plan.metrics(),
                   "worker_peak_rss_mb": rss, "worker_peak_rss_mb_max": max(rss)}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"stage": si, "stage_done": done, "trainer": trainer.state_dict(),
                            "arch": model.arch, "model_config": dataclasses.asdict(model.config),
                            "stage_spec": dataclasses.asdict(stage), "new_params": new,
                            "contract": td.contract.to_dict(), "data": td.plan.provenance()},
                           os.path.join(d, CKPT))
                with open(os.path.join(d, META), "w") as f:
                    json.dump({"stage": si, "arch": model.arch, "model_config": dataclasses.asdict(model.config)}, f)
                checkpoint = ray.train.Checkpoint.from_directory(d)   # ray:
            ray.train.report(_scalars(metrics), checkpoint=checkpoint)  # ray: metrics + checkpoint
        if rank == 0 and not metrics.get("partial_epoch"):
            _append_metrics(cfg, metrics)
            print(progress_line(metrics, len(stages), trainer.cfg.epochs), flush=True)

    return on_checkpoint


def progress_line(m: dict, n_stages: int, epochs: int) -> str:
    """One console line per epoch, printed by rank 0 (the driver shows [imgxlate] lines of workers)."""
    return "  ".join([f"[imgxlate] stage {m['stage'] + 1}/{n_stages} epoch {m['epoch']}/{epochs}",
                      f"step {m['global_step']}", f"train_loss {m.get('train_loss', float('nan')):.4g}",
                      *(f"{k[4:]} {v:.4g}" for k, v in m.items() if k.startswith("val_") and isinstance(v, float)),
                      f"{m['epoch_time_s']:.1f} s", f"peak RSS {m['worker_peak_rss_mb_max']:.0f} MB"])


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports ru_maxrss in KB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _gather(value: float) -> list[float]:
    """``value`` from every rank, in rank order (the process group Ray Train set up)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [value]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def read_checkpoint(checkpoint) -> dict:
    """A run's own checkpoint (optimiser and RNG state included): written by this run, so trusted and
    loaded in full. Model artifacts, the distribution format, load with weights_only."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CKPT), map_location="cpu", weights_only=False)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}


def _append_metrics(cfg: tasks.RunConfig, metrics: dict) -> None:
    """Rewrite <storage>/<name>/imgxlate/metrics.jsonl with one more epoch (object stores cannot append)."""
    uri = storage.join(run_dir(cfg), "imgxlate", "metrics.jsonl")
    try:
        old = storage.read_bytes(uri).decode().splitlines()
    except FileNotFoundError:
        old = []
    # An epoch redone after a failure (its checkpoint was not registered) replaces its earlier line and any
    # later ones. Positions are (stage, step in that stage).
    at = (metrics["stage"], metrics["global_step"])
    kept = [e for e in map(_json_or_none, filter(str.strip, old))
            if e is not None and (e.get("stage", 0), e.get("global_step", -1)) < at]
    storage.write_bytes(uri, "".join(json.dumps(e, default=str) + "\n" for e in [*kept, metrics]).encode())


def _json_or_none(line: str) -> dict | None:
    """A metrics line, or None for one cut short (a full disk), which the rewrite drops."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def run_dir(cfg: tasks.RunConfig) -> str:
    return storage.join(cfg.storage, cfg.name)


def latest_saved(cfg: tasks.RunConfig) -> dict | None:
    """What the checkpoint a rerun resumes from says of its model ({"stage", "arch", "model_config"}); None when
    it resumes none. That is the checkpoint Ray Train's snapshot (checkpoint_manager_snapshot.json) names: with
    no snapshot, or one naming none, Ray starts the run afresh. Read from its meta.json, or the whole state.pt
    for one written before meta.json."""
    fs, path = storage.filesystem(run_dir(cfg))
    root = path.rstrip("/")
    try:
        snapshot = json.loads(storage.retry(fs.cat_file, f"{root}/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return None
    folder = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not folder:
        return None
    try:
        return json.loads(storage.retry(fs.cat_file, f"{root}/{folder}/{META}"))
    except FileNotFoundError:
        pass
    saved = torch.load(io.BytesIO(storage.retry(fs.cat_file, f"{root}/{folder}/{CKPT}")), map_location="cpu",
                       weights_only=False)
    return {k: saved[k] for k in ("stage", "arch", "model_config")}


def _storage(cfg: tasks.RunConfig):
    """(storage_path, storage_filesystem) for Ray Train: local folder, or S3 with an endpoint option."""
    if storage.is_local(cfg.storage):
        return storage.local_path(cfg.storage), None
    import pyarrow.fs

    endpoint = storage.endpoint_from_env()
    if cfg.storage.startswith("s3://") and endpoint:
        scheme, host = endpoint.split("://", 1) if "://" in endpoint else ("https", endpoint)
        fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme, region=os.environ.get(
            "AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")    # as boto3 reads them
        return cfg.storage[len("s3://"):], fs
    return cfg.storage, None


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except Exception:
        return None


class ResourceError(CannotRun, RuntimeError):
    """The Ray cluster cannot place the run's workers (and did not grow to within the wait)."""


def worker_bundle(cfg: tasks.RunConfig) -> dict[str, float]:
    """What one Train worker asks Ray for."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}


def placeable_workers(cfg: tasks.RunConfig, nodes: list[dict]) -> int:
    """How many worker bundles the alive nodes' total resources hold under the run's placement strategy."""
    bundle = {k: v for k, v in worker_bundle(cfg).items() if v > 0}
    per_node = [min((int(n["Resources"].get(k, 0) // v) for k, v in bundle.items()), default=0)
                for n in nodes if n.get("Alive")]
    if cfg.placement == "STRICT_SPREAD":
        return sum(1 for c in per_node if c >= 1)
    if cfg.placement == "STRICT_PACK":
        return max(per_node, default=0)
    return sum(per_node)


def check_resources(cfg: tasks.RunConfig, wait_s: float = 0, log=print) -> None:
    """Stop with ResourceError, before any worker is requested, when the cluster cannot hold the run's
    workers (Ray would otherwise wait for them forever). With ``wait_s``, ask the autoscaler for them
    and wait that long for nodes to join first."""
    if placeable_workers(cfg, ray.nodes()) >= cfg.workers:                       # ray:
        return
    if wait_s > 0:
        from ray.autoscaler.sdk import request_resources  # ray:

        request_resources(bundles=[worker_bundle(cfg)] * cfg.workers)           # ray: a hint to an autoscaler
        log(f"the cluster cannot hold {cfg.workers} workers of {worker_bundle(cfg)} yet: waiting up to "
            f"{wait_s:g} s for nodes to join")
        deadline = time.monotonic() + wait_s
        try:
            while time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                if placeable_workers(cfg, ray.nodes()) >= cfg.workers:            # ray:
                    return
        finally:
            request_resources(bundles=[])                                       # ray: withdraw the hint
    have = ray.cluster_resources()                                              # ray:
    raise ResourceError(
        f"{cfg.workers} workers need {worker_bundle(cfg)} each (placement {cfg.placement}), but the Ray cluster "
        f"has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs in all"
        + (f" and did not grow within {wait_s:g} s" if wait_s > 0 else "")
        + (": drop --gpu or use a cluster with GPU nodes" if cfg.use_gpu and not have.get("GPU") else
           ": use fewer --workers or --cpus-per-worker")
        + ("" if wait_s > 0 else "; where an autoscaler adds nodes, --wait-for-resources SECONDS waits for them"))


def fit(cfg: tasks.RunConfig):
    """Train on Ray Train; returns the ray.train.Result. Same name + storage resumes."""
    cfg = tasks.absolute_paths(cfg)
    path, fs = _storage(cfg)
    env = storage.forwarded_env()
    trainer = ray.train.torch.TorchTrainer(                                  # ray:
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker},
                                               placement_strategy=cfg.placement),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env} if env else None),
    )
    return trainer.fit()


def check_cuda(cfg: tasks.RunConfig) -> None:
    """--gpu: that torch can use CUDA on a GPU node, by one probe task given a GPU, before any worker starts (a
    torch build the nodes' driver cannot run fails every worker, retried --max-failures times). ResourceError,
    one line, when it cannot."""
    from imgxlate.infer.devices import cuda_problem

    probe, t0 = ray.remote(num_cpus=0, num_gpus=1, max_retries=0)(cuda_problem).remote(), time.monotonic()  # ray:
    while not ray.wait([probe], timeout=60)[0]:                                          # ray: every GPU busy
        print(f"[imgxlate] waiting for a free GPU to check CUDA on ({time.monotonic() - t0:.0f} s)", flush=True)
    if problem := ray.get(probe):                                                        # ray:
        raise ResourceError(f"--gpu: {problem}. Install the torch build that matches the GPU nodes' NVIDIA driver "
                            f"(a CUDA 13 build needs driver 580 or later; see cluster/), or train without --gpu")


def export_artifact(cfg: tasks.RunConfig, result) -> str:
    """Write the run's final model as an artifact with metrics and provenance; returns its URI."""
    from imgxlate.artifact import save
    from imgxlate.infer.contract import Contract
    from imgxlate.models import build

    saved = read_checkpoint(result.checkpoint)
    model = build(saved["arch"], saved["model_config"])
    weights = saved["trainer"]["ema"] or saved["trainer"]["model"]
    model.load_state_dict(weights)
    if not all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()):
        raise Diverged(cfg, "the final weights are not finite (NaN or inf)", finished=True)
    history = saved["trainer"]["history"]
    out = cfg.out or storage.join(run_dir(cfg), "model")
    provenance = {"data": cfg.data, "val": cfg.val, **saved.get("data", {}), "run": run_dir(cfg),
                  "git_revision": git_revision(),
                  "stages": [dataclasses.asdict(s) for s in tasks.task_of(cfg).stages(cfg)],
                  "config": dataclasses.asdict(cfg),
                  "workers": cfg.workers, "global_batch": cfg.batch_size * cfg.workers,
                  "steps": saved["trainer"]["step"], "weights": "ema" if saved["trainer"]["ema"] else "model"}
    contract = Contract(**saved["contract"]) if saved.get("contract") else None
    try:                                        # what --amp auto consults (config.json); never worth the artifact
        cost = tasks.precision_cost(cfg, model.eval(), contract)
    except Exception as e:
        cost = None
        print(f"[imgxlate] warning: bf16's quality cost could not be measured ({type(e).__name__}: {e}); the "
              f"artifact records none, so --amp auto runs it in fp32", flush=True)
    save(model, out, provenance=provenance, metrics=_scalars(history[-1]) if history else {}, contract=contract,
         precision_cost=cost)
    return out
