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

import pyarrow as pa
import pyarrow.compute as pc

import imgxlate
from imgxlate.infer import heap
from imgxlate.infer.plan import PlanError, Planner, Shard
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
    actors: int | None = None            # default: one per GPU; on CPUs one per cpus_per_actor (fused)
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    threads_per_actor: int | None = None # torch threads in each actor; default: cpus_per_actor
    batch_size: int = 8                  # images per model run (a model-actor call takes a whole input block)
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
    shard_size: int = 10_000             # inputs per shard: the unit of manifest parts and of resume
    queued_inputs: int = 20_000          # inputs handed to the pipeline ahead of what it has taken
    pipeline: str = "auto"               # fused: read..write in the model actor's call; split: I/O tasks around
                                         # the actors; auto: fused on CPU actors, split on GPU actors


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


def planner(cfg: TranslateConfig, meta: dict, run_id: str) -> Planner:
    """Start listing SRC (in a background thread) into shards; see :mod:`imgxlate.infer.plan`."""
    return Planner(cfg.src, cfg.dst, cfg.extensions, cfg.limit, cfg.format, cfg.suffix, run_id, recipe(cfg, meta),
                   shard_size=cfg.shard_size, ready=max(1, cfg.queued_inputs // (2 * cfg.shard_size)))


def take(cfg: TranslateConfig, p: Planner, max_inputs: int, timeout: float | None = None) -> list[Shard] | None:
    """The next ready shards (see :meth:`Planner.take`), with the plan's errors as JobError."""
    try:
        return p.take(max_inputs, timeout)
    except PlanError as e:
        if e.where == "destination":
            raise JobError(_bucket_problem(cfg.dst, e.error, "read")) from e
        if isinstance(e.error, listing.SourceError):
            raise JobError(str(e.error)) from e
        if e.where == "source":
            raise JobError(f"source {redact(cfg.src)} cannot be listed: {type(e.error).__name__}: "
                           f"{e.error}") from e
        raise


BYTES_PER_PIXEL_ESTIMATE = {"png": 1.8, "jpeg": 0.45, "webp": 0.3}


def dry_run_report(cfg: TranslateConfig, meta: dict, run_id: str) -> dict:
    p = planner(cfg, meta, run_id)
    try:
        sample, to_process, done, refused = [], 0, 0, 0
        while (shards := take(cfg, p, cfg.shard_size)) is not None:
            for sh in shards:
                done += sh.skipped
                for block in sh.tables():
                    status = block.column("status").to_pylist()
                    refused += sum(s == "write_error" for s in status)
                    to_process += sum(s is None for s in status)
                    sample += [u for u, s in zip(block.column("source_uri").to_pylist(), status)
                               if s is None][:20 - len(sample)]
    finally:
        p.stop()
    pixels = []
    for uri in sample:
        try:
            w, h, _, _ = codec.probe(storage.read_bytes(uri))
            pixels.append(w * h)
        except Exception:
            pass
    mean_px = sum(pixels) / len(pixels) if pixels else 0
    scale = meta["scale"]
    est = to_process * mean_px * scale * scale * BYTES_PER_PIXEL_ESTIMATE[cfg.format]
    report = {"inputs": p.listed, "to_process": to_process, "already_done": done, "refused_keys": refused,
              "source_bytes": p.source_bytes, "estimated_output_bytes": int(est), "listing_s": round(p.listing_s, 3),
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
    mode = cfg.pipeline if cfg.pipeline != "auto" else ("split" if gpa else "fused")
    if gpa:
        actors = cfg.actors or max(1, int(gpus / gpa))
    elif mode == "fused":           # the actors do all the work: one per cpus_per_actor
        actors = cfg.actors or max(1, int(cpus // cfg.cpus_per_actor))
        if actors * cfg.cpus_per_actor > cpus:
            raise JobError(f"{actors} model actors x {cfg.cpus_per_actor} CPUs need more than the cluster's "
                           f"{cpus:g} CPUs: lower --actors or --cpus-per-actor")
    else:
        actors = cfg.actors or 1
        if actors * cfg.cpus_per_actor > cpus - cfg.io_cpus:
            raise JobError(f"{actors} model actors x {cfg.cpus_per_actor} CPUs leave no CPU for reading and "
                           f"writing on a cluster with {cpus:g} CPUs: lower --actors or --cpus-per-actor")
    threads = cfg.threads_per_actor or max(1, int(cfg.cpus_per_actor))
    return dataclasses.replace(cfg, gpus_per_actor=gpa, actors=actors, threads_per_actor=threads, pipeline=mode)


class Progress:
    """One console line every ``every_s`` seconds; the total grows while SRC is still being listed."""

    def __init__(self, plan: Planner, every_s: float):
        self.plan, self.every_s = plan, every_s
        self.t0 = self.last = time.time()
        self.printed = -1

    def update(self, counts: Counter, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        n = sum(counts.values())
        if n == self.printed:
            return
        self.last, self.printed = now, n
        skipped = counts["skipped_done"]
        processed = n - skipped
        rate = processed / max(now - self.t0, 1e-9)
        total = self.plan.listed
        left = total - n
        eta = left / rate if rate > 0 and self.plan.listing_done else None
        eta_s = "0m00s" if left == 0 and self.plan.listing_done else "--" if eta is None else \
            f"{int(eta // 60)}m{int(eta % 60):02d}s"
        failed = processed - counts["ok"]
        listed = f"{total}" if self.plan.listing_done else f"{total}+ (listing)"
        _log(f"{n}/{listed} images  {rate:.2f} img/s  ok {counts['ok']}  skipped (done before) {skipped}"
             f"  failed {failed}  ETA {eta_s}")


class ShardBook:
    """The driver's bookkeeping: counters per open shard, and rows on their way to manifest parts. A shard's rows
    are written as a part when a shard completes (or every ``every_rows`` rows, or ``every_s`` seconds), and its
    marker is rewritten after each part, so that a killed run loses at most the rows not yet written."""

    @dataclass
    class Open:
        shard: Shard
        got: int = 0
        parts: list = dataclasses.field(default_factory=list)
        buffer: list = dataclasses.field(default_factory=list)
        counts: Counter = dataclasses.field(default_factory=Counter)

    def __init__(self, dst: str, run_id: str, recipe: str, every_rows: int, every_s: float = 10.0):
        self.dst, self.run_id, self.recipe, self.every_rows, self.every_s = dst, run_id, recipe, every_rows, every_s
        self.open: dict[str, ShardBook.Open] = {}
        self.counts: Counter = Counter()
        self.nbytes: Counter = Counter()
        self.shards = 0
        self.last_flush = time.time()

    def add_shard(self, shard: Shard) -> None:
        self.shards += 1
        self.counts["skipped_done"] += shard.skipped
        if shard.todo:
            self.open[shard.id] = ShardBook.Open(shard, parts=list(shard.prev_parts))

    def add(self, rows: pa.Table) -> None:
        """Rows back from the pipeline (NOT_STARTED rows are left out by the caller)."""
        ids = rows.column("shard")
        for sid in pc.unique(ids).to_pylist():
            mine = rows.filter(pc.equal(ids, sid))
            o = self.open.get(sid)
            if o is None:                       # rows of a shard already recorded (never expected): keep them
                manifest.write_part(self.dst, self.run_id, f"{sid}-extra-{uuid.uuid4().hex[:8]}", mine)
                for kv in pc.value_counts(mine.column("status")).to_pylist():
                    self.counts[kv["values"]] += kv["counts"]
                continue
            o.buffer.append(mine)
            o.got += mine.num_rows
            status = mine.column("status")
            for kv in pc.value_counts(status).to_pylist():
                o.counts[kv["values"]] += kv["counts"]
                self.counts[kv["values"]] += kv["counts"]
            self.nbytes["source"] += pc.sum(mine.column("source_bytes")).as_py() or 0
            ok = mine.filter(pc.equal(status, "ok"))
            self.nbytes["output"] += pc.sum(ok.column("output_bytes")).as_py() or 0
            if o.got >= o.shard.todo:
                self.flush(sid, complete=True)
            elif sum(t.num_rows for t in o.buffer) >= self.every_rows:
                self.flush(sid)
        if time.time() - self.last_flush > self.every_s:
            self.flush_all()

    def flush(self, sid: str, complete: bool = False) -> None:
        o = self.open[sid]
        if o.buffer:
            part = manifest.write_part(self.dst, self.run_id, f"{sid}-{len(o.parts):03d}",
                                       pa.concat_tables(o.buffer))
            o.parts.append(part)
            o.buffer.clear()
        counts = Counter(o.counts)
        counts["ok"] += o.shard.prev_ok
        manifest.write_shard_marker(self.dst, {
            "shard": sid, "n": o.shard.n, "complete": complete, "recipe": self.recipe, "run_id": self.run_id,
            "counts": {k: v for k, v in sorted(counts.items()) if v}, "parts": o.parts})
        if complete:
            del self.open[sid]

    def flush_all(self) -> None:
        for sid in list(self.open):
            if self.open[sid].buffer:
                self.flush(sid)
        self.last_flush = time.time()

    def dropped(self, sid: str) -> list[dict]:
        """Inputs of an open shard that never came back from the pipeline (a block lost after its retries): its
        inputs (the book keeps open shards' input blocks) less the rows this run has for it (buffered, and in its
        parts)."""
        o = self.open[sid]
        mine = [p for p in o.parts if p.startswith(self.run_id + "/")]
        written, _ = manifest.read_parts(self.dst, mine, ["source_uri", "output_uri"])
        seen = set()
        for t in [written, *o.buffer]:
            seen.update(zip(t.column("source_uri").to_pylist(), t.column("output_uri").to_pylist()))
        return [r for b in o.shard.tables() for r in b.to_pylist()
                if (redact(r["source_uri"]), r["output_uri"]) not in seen]


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
    if cfg.shard_size < 1 or cfg.queued_inputs < 1 or cfg.batch_size < 1:
        raise JobError("--shard-size, --queued-inputs and --batch-size must be at least 1")
    if cfg.cpus_per_actor <= 0 or cfg.io_cpus <= 0:
        raise JobError("--cpus-per-actor and --io-cpus must be more than 0")
    if cfg.pipeline not in ("auto", "fused", "split"):
        raise JobError(f"unknown --pipeline {cfg.pipeline!r}: use auto, fused or split")
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
    heap.steady()                               # before the run's threads start (flat driver memory)
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    meta = model_info(cfg)
    t_start = time.time()
    untouched = storage.is_local(cfg.dst) and not os.path.exists(cfg.dst)
    preflight_destination(cfg.dst, run_id)
    if cfg.dry_run:
        try:
            return {"dry_run": dry_run_report(cfg, meta, run_id), "run_id": run_id}
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
    """Remove a local DST that this run created and left without a file (a dry run, an empty SRC: only its
    probe and lease folders are there). The scan stops at the first entry that is not a folder: a run with
    outputs keeps DST as it is, and its outputs' names are never listed at once (they were, at the end of every
    run: +40 MB at a million outputs)."""
    if not created or not os.path.isdir(dst):
        return
    folders = _only_folders(dst)
    for root in reversed(folders or []):        # a folder's subfolders before it
        with contextlib.suppress(OSError):
            os.rmdir(root)                      # only succeeds on an empty folder


def _only_folders(path: str) -> list[str] | None:
    """``path`` and the folders under it, top-down, if there is nothing else under it (links are not followed);
    None at the first file or link."""
    out = [path]
    try:
        with os.scandir(path) as entries:
            for e in entries:
                if not e.is_dir(follow_symlinks=False) or (sub := _only_folders(e.path)) is None:
                    return None
                out += sub
    except OSError:
        return None
    return out


def stream(cfg: TranslateConfig, feed, meta: dict, stop, drain: SignalDrain, lease: Lease, add,
           back=None) -> TranslateConfig:
    """Run the Ray Data pipeline over the input blocks put in ``feed`` until it is closed, handing manifest rows
    (a pyarrow Table) to ``add`` as they arrive, and the number of every row that came back to ``back``. A signal
    or a lost lease drains the pipeline. Returns the config with the resources it ran with."""
    import ray.data

    from imgxlate.infer import pipeline

    rcfg = resolve_resources(cfg)
    # A normal run shows imgxlate's own progress; Ray Data's notices stay in Ray's session logs.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False
    ctx.max_errored_blocks = -1                 # a batch that failed every retry is dropped; the caller gives rows
    saved, callbacks = ctx.target_max_block_size, ctx.custom_execution_callback_classes
    try:
        ctx.target_max_block_size = 1                                   # ray: see pipeline.build
        ctx.custom_execution_callback_classes = [*callbacks, pipeline.bounded_block_stats()]   # ray: flat memory
        # prefetch_batches=0: a block is handed over as soon as it is done, not when the next one is
        for batch in pipeline.build(feed, rcfg, meta, stop).iter_batches(batch_format="pyarrow", batch_size=None,
                                                                         prefetch_batches=0):
            batch = pipeline.unseal(batch)
            rows = batch.filter(pc.not_equal(batch.column("status"), pipeline.NOT_STARTED))
            if rows.num_rows:
                add(rows)
            if back is not None:
                back(batch.num_rows)
            _check_lease(lease, drain)
            heap.trim()
    finally:
        ctx.target_max_block_size, ctx.custom_execution_callback_classes = saved, callbacks
    return rcfg


def _check_lease(lease: Lease, drain: SignalDrain) -> None:
    if lease.lost and drain.signum is None:
        drain.signum = signal.SIGTERM
        _log("the lease on DST was lost (taken over, or not renewed in time): stopping")
        drain.on_signal()


class Feeder(threading.Thread):
    """The driver's side of the Feed: takes ready shards from the plan, records them in the book and puts their
    input blocks in the Feed while fewer than ``queued_inputs`` inputs are in flight (put in, not yet back from
    the pipeline: Ray Data's own backpressure is by bytes, and input blocks are only names, so it would read a
    whole listing ahead); closes the Feed when the plan is done (``done``). An error of the plan is kept in
    ``error``, and the Feed is closed so that the pipeline finishes what it has and ends."""

    STALL_S = 60.0          # nothing came back for this long while full: let one more shard in (a lost block's
                            # inputs never come back, and must not hold the run forever)

    def __init__(self, cfg: TranslateConfig, plan: Planner, book: ShardBook, progress: Progress, feed,
                 lock: threading.Lock, lease: Lease, drain: SignalDrain):
        super().__init__(name="imgxlate-feeder", daemon=True)
        self.cfg, self.plan, self.book, self.progress, self.feed, self.lock = cfg, plan, book, progress, feed, lock
        self.lease, self.drain = lease, drain
        self.stopping = threading.Event()
        self.pushed = self.returned = 0
        self.last_back = time.monotonic()
        self.done = False
        self.error: BaseException | None = None

    def back(self, rows: int) -> None:
        """Rows came back from the pipeline (every row, not_started included)."""
        self.returned += rows
        self.last_back = time.monotonic()

    def push(self, shards: list[Shard]) -> None:
        blocks = []
        for shard in shards:
            with self.lock:
                self.book.add_shard(shard)
                self.progress.update(self.book.counts)
            if self.stopping.is_set():          # drained: recorded as listed, not started
                continue
            blocks += shard.blocks
            self.pushed += shard.todo
        put_blocks(self.feed, blocks)

    def run(self) -> None:
        cap = self.cfg.queued_inputs
        try:
            while not self.stopping.is_set():
                _check_lease(self.lease, self.drain)
                room = cap - (self.pushed - self.returned)
                if room <= 0 and time.monotonic() - self.last_back < self.STALL_S:
                    time.sleep(0.1)
                    continue
                shards = take(self.cfg, self.plan, max(1, room), timeout=0.5)
                if shards is None:
                    self.done = True
                    break
                if room <= 0 and any(sh.todo for sh in shards):
                    self.last_back = time.monotonic()       # one shard with work per stall
                self.push(shards)
        except BaseException as e:
            self.error = e
            if not self.stopping.is_set():
                _log(f"{e}: finishing the inputs already queued, then stopping")
        finally:
            if not self.stopping.is_set():
                self.feed.close.remote()        # readers end once the Feed is empty


def put_blocks(feed, blocks: list[tuple[pa.Table, int]]) -> None:
    """Put (sealed block, rows) pairs in ``feed`` and wait until they are in: by value, in calls of at most ~64 KB
    (a larger argument would go through the object store). An async actor may run calls out of order, so a
    close must come after the wait."""
    import ray

    calls, size = [[]], 0
    for b in blocks:
        if size + b[0].nbytes > 64 * 1024 and calls[-1]:
            calls.append([])
            size = 0
        calls[-1].append(b)
        size += b[0].nbytes
    ray.get([feed.put.remote(c) for c in calls if c])


def _lost_rows(cfg: TranslateConfig, meta: dict, rows: list[dict]) -> pa.Table:
    error = ("this input's block was lost in the pipeline twice: its model actor died "
             f"{cfg.max_model_retries + 1} times (e.g. out of memory) or its reader died, and it failed again when "
             "retried on its own")
    return manifest.to_table([{**r, "source_uri": redact(r["source_uri"]), "status": "model_error", "error": error,
                               "model_id": meta["model_id"], "model_sha256": meta["sha256"], "task": meta["task"]}
                              for r in rows])


def _run(cfg: TranslateConfig, meta: dict, run_id: str, t_start: float, lease: Lease) -> dict:
    plan = planner(cfg, meta, run_id)
    try:
        return _run_plan(cfg, meta, run_id, t_start, lease, plan)
    finally:
        plan.stop()


def _on_this_node(cls):
    """An actor of ``cls`` on the driver's node (0 CPUs): the Feed and the stop flag live and die with the
    driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)   # ray:
    return ray.remote(num_cpus=0, scheduling_strategy=here)(cls).remote()


def _run_plan(cfg: TranslateConfig, meta: dict, run_id: str, t_start: float, lease: Lease, plan: Planner) -> dict:
    """Wait for the first shard with work (a run whose inputs were all done never starts Ray), then run one
    pipeline for the whole plan, fed by a Feeder thread while the listing goes on, until every shard is recorded
    (or a signal drains the run)."""
    dst = cfg.dst.rstrip("/")
    book = ShardBook(dst, run_id, recipe(cfg, meta), cfg.manifest_every_rows)
    progress = Progress(plan, cfg.progress_every_s)
    lock = threading.Lock()
    started_ray, resources = False, None
    drain = SignalDrain(lambda: None)           # until the pipeline exists, a signal only marks the run
    with drain:
        first: list[Shard] = []
        while drain.signum is None and not first and (shards := take(cfg, plan, cfg.queued_inputs, 0.5)) is not None:
            for shard in shards:                # (none ready yet: []; a signal is seen within 0.5 s)
                if shard.todo:
                    first.append(shard)
                else:
                    book.add_shard(shard)
            progress.update(book.counts)
        if first:

            from imgxlate import rayenv
            from imgxlate.infer import pipeline

            if drain.signum is None:
                removed = storage.remove_stale_temporaries(cfg.dst)
                _log(f"run {run_id}: processing started while listing {redact(cfg.src)} ({plan.listed} inputs "
                     f"listed so far, {book.counts['skipped_done']} of them done before)"
                     + (f"; removed {removed} stale temporary files" if removed else ""))
                started_ray = start_ray(cfg)
                drain.install()                 # after ray.init, which sets handlers of its own
            if drain.signum is not None:        # signalled while the plan was listing or Ray was starting
                for shard in first:
                    book.add_shard(shard)
                first = []
        if first:
            ray_log = rayenv.log_path(f"translate-{run_id}")
            _log(f"Ray's own messages: {ray_log}")
            stop = _on_this_node(pipeline.StopFlag)
            feed = _on_this_node(pipeline.Feed)
            feeder = Feeder(cfg, plan, book, progress, feed, lock, lease, drain)

            def on_signal():                    # no new input is read; inputs waiting in the Feed are left
                feeder.stopping.set()
                stop.set.remote()
                feed.close.remote(drop=True)

            drain.on_signal = on_signal
            if drain.signum is not None:        # signalled in between
                on_signal()
            feeder.push(first)
            feeder.start()

            def add(rows: pa.Table) -> None:
                with lock:
                    book.add(rows)
                    progress.update(book.counts)

            with rayenv.output_to(ray_log):
                try:
                    resources = stream(cfg, feed, meta, stop, drain, lease, add, feeder.back)
                finally:
                    feeder.stopping.set()
                    feeder.join(30)             # it checks every 0.5 s; nothing touches Ray after this
                    with lock:
                        book.flush_all()        # rows of outputs already written are recorded, whatever happens
                if drain.signum is None:
                    if feeder.error is not None:
                        raise feeder.error
                    if not feeder.done:         # e.g. the Feed actor died: the readers ended early
                        raise JobError("the pipeline ended before every input was handed to it (see Ray's "
                                       f"messages in {ray_log}); a rerun goes on from what was recorded")
                    _retry_lost(cfg, meta, book, stop, drain, lease, add)
            if feeder.error is not None:        # a drain is reported as such; the plan's error is in the log
                _log(f"(while draining, the plan failed: {feeder.error})")
    progress.update(book.counts, force=True)
    if not plan.listed and drain.signum is None:
        # An existing but empty SRC is not an error (exit 0); a missing one is (exit 2, from the listing).
        _log(f"no inputs under {redact(cfg.src)} with extensions {', '.join(cfg.extensions)}: nothing to do")
        return {"run_id": run_id, "inputs": 0, "counts": {}, "failed": 0}
    return _finish(cfg, meta, run_id, t_start, plan, book, drain.signum, started_ray, resources)


def _retry_lost(cfg: TranslateConfig, meta: dict, book: ShardBook, stop, drain: SignalDrain, lease: Lease,
                add) -> None:
    """Inputs of blocks lost in the pipeline (a block whose model actor died every retry, or whose reader died)
    go through it once more, one input a block, so that one input that kills its actor does not take the rest
    of its block with it; what is lost again gets model_error rows."""
    from imgxlate.infer import pipeline

    lost = [r for sid in list(book.open) for r in book.dropped(sid)]     # (reads the open shards' parts once)
    if not lost:
        return
    _log(f"{len(lost)} inputs were in blocks lost in the pipeline (an actor or task died); retrying them one "
         f"at a time")
    feed = _on_this_node(pipeline.Feed)
    put_blocks(feed, [(pipeline.seal(manifest.to_table([r]), "zstd"), 1) for r in lost])
    feed.close.remote()
    came_back: set = set()

    def add_retried(rows: pa.Table) -> None:
        came_back.update(zip(rows.column("source_uri").to_pylist(), rows.column("output_uri").to_pylist()))
        add(rows)

    try:
        stream(cfg, feed, meta, stop, drain, lease, add_retried)
    finally:
        book.flush_all()
    if drain.signum is not None:
        return
    lost = [r for r in lost if (redact(r["source_uri"]), r["output_uri"]) not in came_back]
    if lost:                                    # every input of a finished run has a row
        book.add(_lost_rows(cfg, meta, lost))


def _finish(cfg: TranslateConfig, meta: dict, run_id: str, t_start: float, plan: Planner, book: ShardBook,
            signum: int | None, started_ray: bool, resources: TranslateConfig | None = None) -> dict:
    """Write the summary (last: it marks the run finished) and report; raise Interrupted after a signal."""
    dst = cfg.dst.rstrip("/")
    counts = book.counts
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
        "inputs": plan.listed,
        "shards": book.shards,
        "counts": {k: v for k, v in sorted(counts.items()) if v},
        "failed": sum(v for k, v in counts.items() if k not in manifest.DONE),
        "source_bytes": book.nbytes["source"],
        "output_bytes": book.nbytes["output"],
        "listing_s": None if plan.listing_s is None else round(plan.listing_s, 3),
        "wall_s": round(wall, 3),
        "images_per_s": round(processed / wall, 3) if wall > 0 else None,
        "manifest": storage.join(redact(manifest.manifest_root(dst)), run_id),
        "config": dataclasses.asdict(cfg),
        "resources": None if resources is None else {k: getattr(resources, k) for k in (
            "pipeline", "actors", "cpus_per_actor", "gpus_per_actor", "threads_per_actor")},
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    summary["config"]["src"], summary["config"]["dst"] = redact(cfg.src), redact(cfg.dst)
    summary["config"]["model"] = redact(cfg.model)
    if signum is not None:
        summary["interrupted"] = signal.Signals(signum).name
        summary["not_started"] = plan.listed - sum(counts.values())
    manifest.write_summary(dst, run_id, summary)
    _log(f"{'interrupted' if signum else 'done'} in {wall:.1f}s: "
         + ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
         + (f"; {summary['not_started']} not started (a rerun does them)" if signum else ""))
    _log(f"outputs under {redact(cfg.dst)}; manifest and summary in {summary['manifest']}")
    if signum is not None:
        if started_ray:
            import ray

            ray.shutdown()                 # no Ray process outlives an interrupted run
        raise Interrupted(signum, summary)
    return summary
