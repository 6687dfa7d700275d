"""The batch job: plan (list, map keys, skip what is done) -> preflight -> Ray Data pipeline ->
manifest parts as results stream in -> summary.json, written last.

    imgxlate translate SRC DST --model MODEL [options]
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import imgxlate
from imgxlate.io import codec, listing, manifest, storage
from imgxlate.io.lease import Lease, LeaseHeld
from imgxlate.io.listing import redact


class JobError(RuntimeError):
    """The job could not run (bad source, unusable destination, bad model): nothing was processed."""


class Interrupted(RuntimeError):
    """SIGTERM / SIGINT: the run drained (what was written is recorded) and stopped; ``summary`` says so."""

    def __init__(self, signum: int, summary: dict):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.summary = signum, summary


class SignalDrain:
    """While active, the first SIGTERM / SIGINT starts a drain (``on_signal``); a second one stops at once."""

    def __init__(self, on_signal):
        self.on_signal, self.signum, self._old = on_signal, None, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without draining")
        self.signum = signum
        _log(f"{signal.Signals(signum).name}: draining: no new inputs are started; the outputs in flight are "
             f"finished and recorded (send it again to stop at once)")
        self.on_signal()

    def __enter__(self):
        return self.install()

    def install(self):
        """(Re)install the handlers: also after ray.init, which sets its own."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                old = signal.signal(s, self._handle)
                self._old.setdefault(s, old)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class TranslateConfig:
    src: str
    dst: str
    model: str
    scale: float | None = None
    suffix: str = ""
    format: str = "png"
    quality: int = 95
    extensions: tuple[str, ...] = listing.IMAGE_EXTS
    limit: int | None = None
    max_pixels: int = codec.DEFAULT_MAX_PIXELS
    max_output_pixels: int = 256_000_000
    tile: int | None = None              # None: 256 on CPU, 1024 on GPU
    overlap: int = 32
    amp: str = "bf16"
    cutout: bool = False
    actors: int | None = None            # default: one per GPU, else 1
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    threads_per_actor: int | None = None # torch threads in each actor; default: cpus_per_actor
    batch_size: int = 8                  # images per model-actor call
    io_batch_size: int = 4               # images per read/decode and encode/write task
    io_cpus: float = 0.25                # logical CPUs per read/decode and encode/write task
    ray_address: str | None = None       # None: start Ray in this process
    num_cpus: int | None = None          # logical CPUs when Ray is started here
    s3_endpoint: str | None = None
    run_id: str | None = None
    dry_run: bool = False
    fail_on_error: bool = False
    progress_every_s: float = 5.0
    manifest_every_rows: int = 1000
    max_model_retries: int = 3           # a batch whose model actor dies is retried this often, then model_error
    wait_for_lease_s: float = 0.0        # another run holds DST: wait this long for it, then stop (exit 2)


def _log(msg: str) -> None:
    print(f"[imgxlate] {msg}", file=sys.stderr, flush=True)


def model_info(cfg: TranslateConfig) -> dict:
    from imgxlate.infer.predictor import model_meta

    if cfg.model == "bicubic":
        scale = cfg.scale or 2
        return {"model_id": f"bicubic-x{scale:g}", "sha256": "", "task": "sr", "scale": scale}
    try:
        meta = model_meta(cfg.model)
    except Exception as e:
        raise JobError(f"model {redact(cfg.model)}: {e}") from e
    if cfg.scale is not None and meta["task"] == "sr" and meta["scale"] != cfg.scale:
        raise JobError(f"model {redact(cfg.model)} is x{meta['scale']}, but --scale {cfg.scale:g} was given")
    return {"model_id": meta["model_id"], "sha256": meta["weights_sha256"], "task": meta["task"],
            "scale": meta["scale"]}


def recipe(cfg: TranslateConfig, meta: dict) -> str:
    """Hash of what decides an output's pixels: the model (id and checksum) and every option that
    changes them. A rerun skips an input only when its earlier ``ok`` row has the same recipe."""
    what = {"model_id": meta["model_id"], "model_sha256": meta["sha256"], "scale": meta["scale"],
            "cutout": cfg.cutout, "format": cfg.format, "suffix": cfg.suffix, "tile": cfg.tile,
            "overlap": cfg.overlap, "amp": cfg.amp, "quality": cfg.quality if cfg.format != "png" else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _bucket_problem(dst: str, e: BaseException, doing: str = "written") -> str:
    where = redact(dst)
    bucket = where.split("://", 1)[1].split("/", 1)[0] if "://" in where else None
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in str(e):
        return f"destination {where}: bucket '{bucket}' does not exist" if bucket else \
            f"destination {where} cannot be created: {e}"
    if isinstance(e, PermissionError) or "AccessDenied" in str(e) or "403" in str(e):
        return f"destination {where}: access denied" + (f" on bucket '{bucket}'" if bucket else "") + f" ({e})"
    return f"destination {where} cannot be {doing}: {type(e).__name__}: {e}"


def preflight_destination(dst: str, run_id: str) -> None:
    """Write and delete a probe object, so a missing bucket or denied access stops the job first."""
    probe = storage.join(manifest.manifest_root(dst), f".probe-{run_id}")
    try:
        storage.write_bytes(probe, b"imgxlate write probe")
        fs, path = storage.filesystem(probe)
        fs.rm(path)
    except Exception as e:
        raise JobError(_bucket_problem(dst, e)) from e


def existing_outputs(dst: str) -> set[str]:
    """Every object under DST, as filesystem paths (see :func:`fs_path`), from one listing."""
    fs, path = storage.filesystem(dst)
    fs.invalidate_cache()
    try:
        return {fs_path(p if storage.is_local(dst) else f"{dst.split('://', 1)[0]}://{p}") for p in fs.find(path)}
    except FileNotFoundError:
        return set()


def fs_path(uri: str) -> str:
    """Comparable form of a URI: an absolute local path, or bucket/key."""
    return os.path.abspath(uri) if storage.is_local(uri) else uri.split("://", 1)[1]


@dataclass
class Plan:
    todo: list[dict]            # go through the pipeline
    final: list[dict]           # rows known without processing (skipped_done, unsafe keys)
    total: int
    source_bytes: int


def plan(cfg: TranslateConfig, meta: dict, run_id: str) -> Plan:
    try:
        items = listing.list_inputs(cfg.src, cfg.extensions, cfg.limit, exclude=cfg.dst)
    except listing.SourceError as e:
        raise JobError(str(e)) from e
    except Exception as e:
        raise JobError(f"source {redact(cfg.src)} cannot be listed: {type(e).__name__}: {e}") from e
    keys = listing.output_keys([it.key for it in items], codec.EXTENSIONS[cfg.format], cfg.suffix,
                               [it.source_uri for it in items])
    dst = cfg.dst.rstrip("/")
    this_recipe = recipe(cfg, meta)
    try:
        previous = manifest.read_all(dst, ["source_uri", "output_uri", "status", "recipe"]).to_pylist()
        done = {(r["source_uri"], r["output_uri"]) for r in previous
                if r["status"] in manifest.DONE and r["recipe"] == this_recipe}
        present = existing_outputs(dst) if done else set()
    except Exception as e:
        raise JobError(_bucket_problem(dst, e, "read")) from e
    attempts = Counter(r["source_uri"] for r in previous if r["status"] != "skipped_done")
    todo, final = [], []
    for it, key in zip(items, keys):
        source = redact(it.source_uri)
        row = {"source_uri": it.source_uri, "key": it.key, "run_id": run_id, "attempt": attempts[source] + 1,
               "source_bytes": it.size if it.size >= 0 else None, "recipe": this_recipe}
        if isinstance(key, Exception):
            final.append({**row, "source_uri": source, "status": "write_error", "error": str(key),
                          "output_uri": None})
            continue
        out = storage.join(dst, key)
        row["output_uri"] = out
        if (source, out) in done and fs_path(out) in present:
            final.append({**row, "source_uri": source, "status": "skipped_done", "attempt": attempts[source],
                          "model_id": meta["model_id"], "model_sha256": meta["sha256"], "task": meta["task"]})
        else:
            todo.append(row)
    return Plan(todo, final, len(items), sum(max(it.size, 0) for it in items))


BYTES_PER_PIXEL_ESTIMATE = {"png": 1.8, "jpeg": 0.45, "webp": 0.3}


def dry_run_report(cfg: TranslateConfig, meta: dict, p: Plan) -> dict:
    sample = p.todo[:20]
    pixels = []
    for row in sample:
        try:
            w, h, _, _ = codec.probe(storage.read_bytes(row["source_uri"]))
            pixels.append(w * h)
        except Exception:
            pass
    mean_px = sum(pixels) / len(pixels) if pixels else 0
    scale = meta["scale"]
    est = len(p.todo) * mean_px * scale * scale * BYTES_PER_PIXEL_ESTIMATE[cfg.format]
    report = {"inputs": p.total, "to_process": len(p.todo),
              "already_done": sum(r["status"] == "skipped_done" for r in p.final),
              "refused_keys": sum(r["status"] == "write_error" for r in p.final),
              "source_bytes": p.source_bytes, "estimated_output_bytes": int(est),
              "estimate_basis": f"{len(pixels)} sampled headers, mean {mean_px / 1e6:.2f} MP, x{scale:g}, "
                                f"~{BYTES_PER_PIXEL_ESTIMATE[cfg.format]} bytes/px for {cfg.format}"}
    _log(f"dry run: {report['inputs']} inputs under {redact(cfg.src)}; {report['to_process']} to process, "
         f"{report['already_done']} already done, {report['refused_keys']} refused keys")
    _log(f"dry run: source {p.source_bytes / 1e6:.1f} MB; estimated output {est / 1e6:.1f} MB "
         f"({report['estimate_basis']})")
    return report


def start_ray(cfg: TranslateConfig) -> bool:
    """Join the cluster (RAY_ADDRESS / --ray-address) or start Ray here; True when this call did.
    Credentials are not shipped: workers use their own environment / instance role."""
    from imgxlate import rayenv

    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION") if os.environ.get(k)}
    return rayenv.start_or_join(cfg.ray_address, cfg.num_cpus, env)


def resolve_resources(cfg: TranslateConfig) -> TranslateConfig:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = ray.cluster_resources().get("CPU", 1)
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1 if gpus else 0)
    actors = cfg.actors or (max(1, int(gpus / gpa)) if gpa else 1)
    if not gpa and actors * cfg.cpus_per_actor > cpus - cfg.io_cpus:
        raise JobError(f"{actors} model actors x {cfg.cpus_per_actor} CPUs leave no CPU for reading and "
                       f"writing on a cluster with {cpus:g} CPUs: lower --actors or --cpus-per-actor")
    threads = cfg.threads_per_actor or max(1, int(cfg.cpus_per_actor))
    return dataclasses.replace(cfg, gpus_per_actor=gpa, actors=actors, threads_per_actor=threads)


class Progress:
    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.t0 = self.last = time.time()
        self.counts: Counter = Counter()
        self.printed = -1

    def update(self, statuses: list[str], force: bool = False) -> None:
        self.counts.update(statuses)
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        n = sum(self.counts.values())
        if n == self.printed:
            return
        self.last, self.printed = now, n
        skipped = self.counts["skipped_done"]
        processed = n - skipped
        rate = processed / max(now - self.t0, 1e-9)
        left = self.total - n
        eta = left / rate if rate > 0 else None
        eta_s = "0m00s" if left == 0 else "--" if eta is None else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        failed = processed - self.counts["ok"]
        _log(f"{n}/{self.total} images  {rate:.2f} img/s  ok {self.counts['ok']}  skipped (done before) {skipped}"
             f"  failed {failed}  ETA {eta_s}")


RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def _same_place(a: str, b: str) -> bool:
    try:
        return storage.is_local(a) == storage.is_local(b) and storage.location(a) == storage.location(b)
    except Exception:  # an unusable URI is reported by the listing or the preflight
        return False


def check(cfg: TranslateConfig) -> None:
    """Refuse, before any work, what the job must not run with."""
    if cfg.format not in codec.FORMATS:
        raise JobError(f"unknown --format {cfg.format!r}: use {', '.join(codec.FORMATS)}")
    for what, uri in (("SRC", cfg.src), ("DST", cfg.dst), ("--model", cfg.model)):
        if ":" in listing.userinfo(uri):
            raise JobError(f"{what} {redact(uri)} has credentials in it, which would end up in logs: give them "
                           f"through the environment (AWS_ACCESS_KEY_ID, ...), a profile or an instance role")
    if cfg.run_id is not None and (not RUN_ID.fullmatch(cfg.run_id) or ".." in cfg.run_id or cfg.run_id == "."):
        raise JobError(f"--run-id {cfg.run_id!r} names a folder under DST/_manifest: use only letters, digits, "
                       f"'.', '_' and '-' (and not '.' or '..')")
    if any(ch in "/\\" or ord(ch) < 32 for ch in cfg.suffix):
        raise JobError(f"--suffix {cfg.suffix!r}: no slashes or control characters")
    if _same_place(cfg.src, cfg.dst):
        raise JobError(f"SRC and DST are the same folder or prefix ({redact(cfg.dst)}): the outputs would "
                       f"overwrite the inputs; write elsewhere (a folder inside SRC is fine: it is left out of "
                       f"the listing)")


def run(cfg: TranslateConfig) -> dict:
    """Run the job; returns the summary. Raises JobError when the job cannot run, Interrupted when a signal
    stopped it (after recording every output it wrote and writing the summary)."""
    check(cfg)
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    meta = model_info(cfg)
    t_start = time.time()
    untouched = storage.is_local(cfg.dst) and not os.path.exists(cfg.dst)
    preflight_destination(cfg.dst, run_id)
    if cfg.dry_run:
        try:
            return {"dry_run": dry_run_report(cfg, meta, plan(cfg, meta, run_id)), "run_id": run_id}
        finally:
            _remove_empty_folders(cfg.dst, untouched)    # a dry run leaves no trace
    try:
        lease = Lease(cfg.dst, run_id, wait_s=cfg.wait_for_lease_s).acquire()
    except LeaseHeld as e:
        raise JobError(str(e)) from e
    except Exception as e:
        raise JobError(_bucket_problem(cfg.dst, e)) from e
    try:
        return _run(cfg, meta, run_id, t_start, lease)
    finally:
        lease.release()                         # never raises: a lease it cannot release expires by itself
        _remove_empty_folders(cfg.dst, untouched)        # e.g. an empty SRC: DST is not left behind


def _remove_empty_folders(dst: str, created: bool) -> None:
    """Remove the local folders this run created under DST (its probe, its lease) if they stayed empty."""
    if not created or not os.path.isdir(dst):
        return
    for root, _, _ in sorted(os.walk(dst), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)                      # only succeeds on an empty folder


def stream(cfg: TranslateConfig, todo: list[dict], meta: dict, drain: SignalDrain, lease: Lease, add) -> set[str]:
    """Run ``todo`` through the Ray Data pipeline, handing manifest rows to ``add`` as they arrive; returns the
    output URIs that came back (unique per input). A signal or a lost lease drains the pipeline."""
    import ray
    import ray.data

    from imgxlate.infer import pipeline

    rcfg = resolve_resources(cfg)
    # A normal run shows imgxlate's own progress; Ray Data's notices stay in Ray's session logs.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False
    ctx.max_errored_blocks = -1                 # a batch that failed every retry is dropped; the caller gives rows
    stop = ray.remote(num_cpus=0)(pipeline.StopFlag).remote()
    drain.on_signal = stop.set.remote
    if drain.signum is not None:                # signalled while Ray was starting
        stop.set.remote()
    seen: set[str] = set()
    for batch in pipeline.build(todo, rcfg, meta, stop).iter_batches(batch_format="pyarrow", batch_size=None,
                                                                     prefetch_batches=1):
        rows = batch.to_pylist()
        seen.update(r["output_uri"] for r in rows)
        add([r for r in rows if r["status"] != pipeline.NOT_STARTED])
        if lease.lost and drain.signum is None:
            drain.signum = signal.SIGTERM
            _log("the lease on DST was lost (taken over, or not renewed in time): stopping")
            stop.set.remote()
    return seen


def _run(cfg: TranslateConfig, meta: dict, run_id: str, t_start: float, lease: Lease) -> dict:
    p = plan(cfg, meta, run_id)
    if not p.total:
        # An existing but empty SRC is not an error (exit 0); a missing one is (exit 2, from the listing).
        _log(f"no inputs under {redact(cfg.src)} with extensions {', '.join(cfg.extensions)}: nothing to do")
        return {"run_id": run_id, "inputs": 0, "counts": {}, "failed": 0}
    removed = storage.remove_stale_temporaries(cfg.dst)
    _log(f"run {run_id}: {p.total} inputs, {len(p.todo)} to process, "
         f"{sum(r['status'] == 'skipped_done' for r in p.final)} already done"
         + (f", removed {removed} stale temporary files" if removed else ""))

    dst = cfg.dst.rstrip("/")
    progress = Progress(p.total, cfg.progress_every_s)
    # The driver keeps counters, not rows: rows go to manifest parts as they arrive.
    parts, buffer, counts, nbytes = 0, list(p.final), Counter(), Counter()
    seen: set[str] = set()                 # outputs that came back from the pipeline (to find dropped batches)
    progress.update([r["status"] for r in p.final])

    def flush():
        nonlocal parts
        if buffer:
            manifest.write_part(dst, run_id, parts, buffer)
            parts += 1
            for r in buffer:
                counts[r["status"]] += 1
                if r["status"] != "skipped_done":
                    nbytes["source"] += r.get("source_bytes") or 0
                if r["status"] == "ok":
                    nbytes["output"] += r.get("output_bytes") or 0
            buffer.clear()

    started_ray = False
    drain = SignalDrain(lambda: None)           # until the pipeline exists, a signal only marks the run
    with drain:
        if p.todo and drain.signum is None:
            from imgxlate import rayenv

            started_ray = start_ray(cfg)
            drain.install()                     # after ray.init, which sets handlers of its own
            ray_log = rayenv.log_path(f"translate-{run_id}")
            _log(f"Ray's own messages: {ray_log}")
            last_flush = [time.time()]

            def add(rows: list[dict]) -> None:
                buffer.extend(rows)
                progress.update([r["status"] for r in rows])
                if len(buffer) >= cfg.manifest_every_rows or time.time() - last_flush[0] > 10:
                    flush()
                    last_flush[0] = time.time()
            with rayenv.output_to(ray_log):
                try:
                    seen = stream(cfg, p.todo, meta, drain, lease, add)
                finally:
                    flush()                     # rows of outputs already written are recorded, whatever happens
            if drain.signum is None:
                dropped = [r for r in p.todo if r["output_uri"] not in seen]
                for r in dropped:
                    buffer.append({**r, "source_uri": redact(r["source_uri"]), "status": "model_error",
                                   "error": f"this input's batch failed {cfg.max_model_retries + 1} times in the "
                                            f"pipeline (a model actor or task died, e.g. out of memory); not "
                                            f"retried further",
                                   "model_id": meta["model_id"], "model_sha256": meta["sha256"],
                                   "task": meta["task"]})
                progress.update(["model_error"] * len(dropped))
        flush()
    progress.update([], force=True)

    wall = time.time() - t_start
    processed = sum(v for k, v in counts.items() if k != "skipped_done")
    summary = {
        "run_id": run_id,
        "imgxlate_version": imgxlate.__version__,
        "src": redact(cfg.src),
        "dst": redact(cfg.dst),
        "model": redact(cfg.model),
        "model_id": meta["model_id"],
        "model_sha256": meta["sha256"],
        "task": meta["task"],
        "inputs": p.total,
        "counts": dict(sorted(counts.items())),
        "failed": sum(v for k, v in counts.items() if k not in manifest.DONE),
        "source_bytes": nbytes["source"],
        "output_bytes": nbytes["output"],
        "wall_s": round(wall, 3),
        "images_per_s": round(processed / wall, 3) if wall > 0 else None,
        "manifest": storage.join(redact(manifest.manifest_root(dst)), run_id),
        "config": dataclasses.asdict(cfg),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    summary["config"]["src"], summary["config"]["dst"] = redact(cfg.src), redact(cfg.dst)
    summary["config"]["model"] = redact(cfg.model)
    if drain.signum is not None:
        summary["interrupted"] = signal.Signals(drain.signum).name
        summary["not_started"] = p.total - sum(counts.values())
    manifest.write_summary(dst, run_id, summary)
    _log(f"{'interrupted' if drain.signum else 'done'} in {wall:.1f}s: "
         + ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
         + (f"; {summary['not_started']} not started (a rerun does them)" if drain.signum else ""))
    _log(f"outputs under {redact(cfg.dst)}; manifest and summary in {summary['manifest']}")
    if drain.signum is not None:
        if started_ray:
            import ray

            ray.shutdown()                 # no Ray process outlives an interrupted run
        raise Interrupted(drain.signum, summary)
    return summary
