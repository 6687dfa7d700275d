"""The batch job, read like ``main``: check -> preflight -> dry run, or lease -> drive -> summary.

    imgxlate translate SRC DST --model MODEL [options]

    plan (list SRC, cut shards, skip what is done: plan.py) -> Feeder (feeder.py) -> Ray Data pipeline
    (raydata.py, stages.py), or for a small run the same stages in this process (inprocess.py) -> rows into
    manifest parts and shard markers as results stream in (book.py) -> summary.json, written last

A run's shared state is one :class:`~imgxlate.infer.run.Run`; its options and checks are
:mod:`imgxlate.infer.config`. Design notes: imgxlate/infer/DESIGN.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import signal
import time
import uuid

import imgxlate
from imgxlate.infer import counters, heap, inprocess, pieces, raydata
from imgxlate.infer.blocks import seal
from imgxlate.infer.book import RESERVE_BYTES, ShardBook, lost_rows
from imgxlate.infer.config import (
    JobError,
    ModelChanged,
    TranslateConfig,
    check,
    check_same_model,
    destination_problem,
    equivalent_recipes,
    input_format,
    model_info,
    recipe,
)
from imgxlate.infer.feeder import Feeder, take
from imgxlate.infer.plan import Planner, Shard, input_table
from imgxlate.infer.run import DstFailed, Interrupted, Progress, Run, SignalDrain
from imgxlate.io import codec, manifest, storage
from imgxlate.io.lease import LOCK_FILE, Lease, LeaseHeld, LeaseUnsafe, NoLease
from imgxlate.io.listing import redact
from imgxlate.log import log

__all__ = ["DstFailed", "Interrupted", "JobError", "TranslateConfig", "run"]


def run(cfg: TranslateConfig) -> dict:
    """Run the job; returns the summary. Raises JobError when the job cannot run, Interrupted when a signal
    stopped it and DstFailed when DST failed (full, over quota, ...: both after recording every output it wrote
    and writing the summary)."""
    if storage.spelt_as_path(cfg.dst):          # file://, file:, ~: os calls below take a path
        cfg = dataclasses.replace(cfg, dst=storage.local_path(cfg.dst))
    check(cfg)
    heap.arenas()                               # before the run's threads start (flat driver memory)
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    meta = model_info(cfg)
    t_start = time.time()
    untouched = storage.is_local(cfg.dst) and not os.path.exists(storage.local_path(cfg.dst))   # file:// too
    preflight_destination(cfg.dst, run_id)
    try:
        if cfg.dry_run:                         # a dry run leaves no trace
            return {"dry_run": dry_run_report(cfg, meta, run_id), "run_id": run_id}
        lease = take_lease(cfg, run_id)
        try:
            book = ShardBook(cfg.dst.rstrip("/"), run_id, recipe(cfg, meta), cfg.manifest_every_rows)
            reserve_room(cfg, book)
            plan = planner(cfg, meta, run_id)
            try:
                return drive(Run(cfg, meta, run_id, t_start, lease, plan, book,
                                 Progress(plan, cfg.progress_every_s), SignalDrain(lambda: None)))
            finally:
                plan.stop()
                book.free_reserve()
        finally:
            lease.release()                     # never raises: a lease it cannot release expires by itself
            if lease.lost:                      # taken over since its last heartbeat (or seen lost while it ran)
                log(f"warning: run {run_id} lost its lease on {redact(cfg.dst)}: another run may have written "
                    f"this DST too; `imgxlate verify` checks its outputs")
    finally:
        if untouched:                           # e.g. an empty SRC: DST is not left behind
            with contextlib.suppress(OSError):  # nor the lock file of the lease this run held on it
                os.remove(os.path.join(storage.local_path(cfg.dst), manifest.MANIFEST_DIR, LOCK_FILE))
            storage.remove_empty_tree(storage.local_path(cfg.dst))


def take_lease(cfg: TranslateConfig, run_id: str) -> Lease | NoLease:
    """The lease on DST (its store checked first: see imgxlate/io/lease.py), or none with --lease off."""
    if cfg.lease == "off":
        log("--lease off: no lease on DST; two runs on this DST would both write it")
        return NoLease(cfg.dst).acquire()
    try:
        lease = Lease(cfg.dst, run_id, wait_s=cfg.wait_for_lease_s).acquire()
    except (LeaseHeld, LeaseUnsafe) as e:
        raise JobError(str(e)) from e
    except Exception as e:
        raise JobError(destination_problem(cfg.dst, e)) from e
    if lease.kind == "check-then-write":
        log(f"the lease on {redact(cfg.dst)} is a check-then-write (this store has no conditional writes): "
            f"two runs started at the same moment could both take it")
    return lease


def reserve_room(cfg: TranslateConfig, book: ShardBook) -> None:
    """Room for the manifest on a local DST that fills up (:meth:`ShardBook.reserve`)."""
    try:
        book.reserve()
    except OSError as e:
        if (why := storage.dst_failure(e)) is None:
            raise JobError(destination_problem(cfg.dst, e)) from e
        raise JobError(f"{why} ({redact(cfg.dst)}): a run needs at least {RESERVE_BYTES >> 20} MB free there for "
                       f"its manifest, besides its outputs; free space and rerun") from e


def preflight_destination(dst: str, run_id: str) -> None:
    """Write and delete a probe object, so a missing bucket or denied access stops the job first."""
    probe = storage.join(manifest.manifest_root(dst), f".probe-{run_id}")
    try:
        storage.write_bytes(probe, b"imgxlate write probe")
        fs, path = storage.filesystem(probe)
        fs.rm(path)
    except Exception as e:
        raise JobError(destination_problem(dst, e)) from e


def planner(cfg: TranslateConfig, meta: dict, run_id: str) -> Planner:
    """Start listing SRC (in a background thread) into shards; see :mod:`imgxlate.infer.plan`."""
    return Planner(cfg.src, cfg.dst, cfg.extensions, cfg.limit, cfg.format, cfg.suffix, run_id, recipe(cfg, meta),
                   shard_size=cfg.shard_size, ready=max(1, cfg.queued_inputs // (2 * cfg.shard_size)),
                   equivalent=equivalent_recipes(cfg, meta), input_format=input_format(cfg),
                   output_format=cfg.output_format, image_column=cfg.image_column, key_column=cfg.key_column)


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
    log(f"dry run: {report['inputs']} inputs under {redact(cfg.src)}; {report['to_process']} to process, "
         f"{report['already_done']} already done, {report['refused_keys']} refused keys")
    log(f"dry run: source {p.source_bytes / 1e6:.1f} MB; estimated output {est / 1e6:.1f} MB "
         f"({report['estimate_basis']})")
    return report


def drive(run: Run) -> dict:
    """Wait for the first shard with work (a run whose inputs were all done never starts Ray), then run a small
    run in this process (inprocess.chosen), any other in one pipeline for the whole plan, fed by a Feeder thread
    while the listing goes on, until every shard is recorded (or a signal or DST failing drains the run). Until
    the pipeline exists, a signal only marks the run."""
    started_ray, resources = False, None
    with run.drain:
        first = _first_work(run)
        here = inprocess.chosen(run, first) if first and not run.drain.stopping else None
        if first and not run.drain.stopping:
            _clean_up(run, here)
            started_ray = here is None and _start(run)
        if run.drain.stopping:                  # signalled while the plan was listing or Ray was starting
            for shard in first:
                run.book.add_shard(shard)
        elif here:
            try:
                resources = inprocess.stream(run, first)
            except KeyboardInterrupt:
                if run.drain.hard:              # a second Ctrl-C, after every written output was recorded
                    inprocess.unmark(run)
                raise
        elif first:
            try:
                resources = _pipeline(run, first)
            except BaseException:
                if started_ray:                 # a caller's process (imgxlate.translate) is not left holding it
                    raydata.shutdown()
                raise
    run.progress.update(run.book.counts, force=True)
    if not run.plan.listed and not run.drain.stopping:
        # An existing but empty SRC is not an error (exit 0); a missing one is (exit 2, from the listing).
        log(f"no inputs under {redact(run.cfg.src)} with extensions {', '.join(run.cfg.extensions)}: nothing to do")
        return {"run_id": run.run_id, "inputs": 0, "counts": {}, "failed": 0}
    return finish(run, started_ray, resources)


def _first_work(run: Run) -> list[Shard]:
    """The first ready shards with work; shards done before are recorded as they pass. [] when there is none
    (all done, an empty SRC) or a signal came (seen within 0.5 s)."""
    first: list[Shard] = []
    while not run.drain.stopping and not first and \
            (shards := take(run.cfg, run.plan, run.cfg.queued_inputs, 0.5)) is not None:
        for shard in shards:
            if shard.todo:
                first.append(shard)
            else:
                run.book.add_shard(shard)
        run.progress.update(run.book.counts)
    return first


def _clean_up(run: Run, in_process: str | None) -> None:
    """Clean up after killed writers, and say that processing started (and where)."""
    removed = storage.remove_stale_temporaries(run.cfg.dst)
    if run.cfg.output_format != "files":
        removed += pieces.remove_stale(run.cfg.dst, run.run_id)
    log(f"run {run.run_id}: processing started while listing {redact(run.cfg.src)} ({run.plan.listed} inputs "
        f"listed so far, {run.book.counts['skipped_done']} of them done before)"
        + (f"; removed {removed} stale temporary files" if removed else "")
        + (f"; {in_process}" if in_process else ""))


def _start(run: Run) -> bool:
    """Start or join Ray; True when this run started Ray."""
    heap.steady()                               # the driver only waits on Ray from here (flat driver memory)
    started = raydata.start_ray(run.cfg)
    run.drain.install()                         # after ray.init, which sets handlers of its own
    return started


def _actor_start_failed(e: BaseException) -> bool:
    """Whether ``e`` (or what it came from) is Ray's word that an actor's constructor raised."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "actor_init_failed", False):
            return True
        e = e.__cause__ or e.__context__
    return False


def _check_model_again(run: Run, e: BaseException) -> None:
    """A model actor that cannot start fails the pipeline with Ray's traceback, in which the actor's own error is
    text. When the cause is the model (its artifact replaced, damaged or removed since the run's start, where this
    process checked it), the check made at the start is made again here and its one line raised: JobError, or
    ModelChanged for other weights. When this process still finds the weights it started with but an actor found
    others, the path names another copy on the actor's node. Anything else is left to the caller."""
    try:
        now = model_info(run.cfg)
    except JobError as again:
        raise again from e
    check_same_model(run.cfg.model, now["sha256"], run.meta["sha256"] or None, now["contract"], run.meta["contract"])
    if "ModelChanged" in str(e):                 # the driver's copy is the one it checked: the node's differs
        raise ModelChanged(f"a model actor loaded other weights from {redact(run.cfg.model)} than this process "
                           f"did ({_node_of(str(e))}): that path names another copy on its node. Every node must "
                           f"see the same model: give a path all nodes share, or an s3:// URI") from e


def _node_of(text: str) -> str:
    at = text.find(" on node ")
    return "on node " + text[at + 9:].split(":", 1)[0].split(" ", 1)[0] if at >= 0 else "on another node"


def _pipeline(run: Run, first: list[Shard]) -> TranslateConfig:
    """One pipeline for the whole plan; returns the config with the resources it ran with."""
    from imgxlate import rayenv

    ray_log = rayenv.log_path(f"translate-{run.run_id}")
    log(f"Ray's own messages: {ray_log}")
    stop = raydata.on_this_node(raydata.StopFlag)
    feed = raydata.on_this_node(raydata.Feed)
    feeder = Feeder(run, feed, first)

    def on_signal():                            # no new input is read; inputs waiting in the Feed are left
        feeder.stopping.set()
        stop.set.remote()
        feed.close.remote(drop=True)

    run.drain.on_signal = on_signal
    if run.drain.stopping:                      # signalled in between
        on_signal()
    feeder.start()                              # it puts the first shards in while Ray Data starts the actors
    with rayenv.output_to(ray_log):
        try:
            try:
                resources = raydata.stream(run.cfg, feed, run.meta, stop, feeder.on_rows, run.check_lease)
            finally:
                feeder.stopping.set()
                feeder.join(30)                 # it checks every 0.5 s; nothing touches Ray after this
                with run.lock:
                    run.book.flush_all()        # rows of outputs already written are recorded, whatever happens
            if run.book.failure is not None:    # DST refused the last parts: no retry of lost blocks
                run.drain.stop(run.book.failure)
            if not run.drain.stopping:
                feeder.raise_if_incomplete(ray_log)
                retry_lost(run, stop)
        except Exception as e:
            if _actor_start_failed(e):
                _check_model_again(run, e)      # the model replaced or gone since this run checked it: one line
            raise
    if feeder.error is not None:                # a drain is reported as such; the plan's error is in the log
        log(f"(while draining, the plan failed: {feeder.error})")
    return resources


def retry_lost(run: Run, stop) -> None:
    """Inputs of blocks lost in the pipeline (a block whose model actor died every retry, or whose reader died)
    go through it once more, one input a block, so that one input that kills its actor does not take the rest
    of its block with it; what is lost again gets model_error rows."""
    lost = run.book.missing()                  # (reads the open shards' parts once)
    if not lost:
        return
    log(f"{len(lost)} inputs were in blocks lost in the pipeline (an actor or task died); retrying them one "
        f"at a time")
    feed = raydata.on_this_node(raydata.Feed)
    raydata.put_blocks(feed, [(seal(input_table([r]), "zstd"), 1) for r in lost])
    feed.close.remote()
    came_back: set = set()

    def on_rows(rows, returned: int) -> None:
        if rows.num_rows:
            came_back.update(zip(rows.column("source_uri").to_pylist(), rows.column("output_uri").to_pylist()))
            run.add(rows)

    try:
        raydata.stream(run.cfg, feed, run.meta, stop, on_rows, run.check_lease, fit=True)
    finally:
        run.book.flush_all()
    if run.drain.stopping or run.book.failure is not None:
        return
    lost = [r for r in lost if (redact(r["source_uri"]), r["output_uri"]) not in came_back]
    if lost:                                    # every input of a finished run has a row
        rows = lost_rows(run.meta, lost, run.cfg.max_model_retries)
        run.book.add(rows)
        counters.count(rows)                    # rows no worker made


def finish(run: Run, started_ray: bool, resources: TranslateConfig | None) -> dict:
    """Write the summary (last: it marks the run finished) and report; raise Interrupted after a signal, DstFailed
    when DST failed. After DST failed, the reserve is freed first and the rows DST refused are tried once more."""
    signum = run.drain.signum                   # read once: the Feeder may still see a lost lease
    why, unrecorded = run.drain.reason or run.book.failure, 0
    if run.cfg.output_format != "files":       # pieces of shards left unfinished: those shards are redone whole
        if dropped := run.book.drop_unfinished_objects():
            log(f"{dropped} outputs of shards whose object was not written yet are left: the next run redoes "
                f"those shards whole")
        with contextlib.suppress(Exception):     # this run's, and any a killed run's workers wrote late
            pieces.remove_stale(run.cfg.dst, run.run_id)
            pieces.remove(run.cfg.dst, run.run_id)
    if why is not None:
        run.book.free_reserve()                 # the pipeline has ended: this room is for the manifest
        unrecorded = run.book.last_try()
    summary = _summary(run, resources, signum, why, unrecorded)
    try:
        try:
            manifest.write_summary(run.cfg.dst.rstrip("/"), run.run_id, summary)
        except Exception as e:
            if storage.dst_failure(e) is None:
                raise
            run.book.free_reserve()             # DST filled up at the very end: this is what the reserve is for
            manifest.write_summary(run.cfg.dst.rstrip("/"), run.run_id, summary)
    except Exception as e:
        if (failed := storage.dst_failure(e)) is None:
            raise
        why = why or failed
        summary.update(stopped=why, not_started=run.plan.listed - sum(run.book.counts.values()),
                       listed_all=run.plan.listing_done)
        log(f"{failed}: the run's summary could not be written ({type(e).__name__}: {e})")
    stopped = signum is not None or why is not None
    log(f"{'stopped' if why else 'interrupted' if signum else 'done'} in {summary['wall_s']:.1f}s: "
        + ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
        + (f"; {summary['not_started']} not started (a rerun does them)" if stopped else ""))
    log(f"outputs under {redact(run.cfg.dst)}; manifest and summary in {summary['manifest']}")
    if started_ray:        # no Ray process outlives the run that started it: a caller's next imgxlate.translate gets
        raydata.shutdown() # its own --ray-address, --num-cpus and endpoint, and small runs run in-process again
    heap.compute()         # a caller's own torch work after a run on Ray gets a heap for compute back (heap.steady)
    if stopped:
        if signum is not None and run.drain.reason is None:
            raise Interrupted(signum, summary)
        raise DstFailed(summary)
    return summary


def _summary(run: Run, resources: TranslateConfig | None, signum: int | None, why: str | None = None,
             unrecorded: int = 0) -> dict:
    cfg, meta, run_id, plan, book = run.cfg, run.meta, run.run_id, run.plan, run.book
    dst = cfg.dst.rstrip("/")
    counts = book.counts
    wall = time.time() - run.t_start
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
        "precision": meta["precision"],
        "precision_reason": meta["precision_reason"],
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
        "lease": run.lease.kind,
        "config": dataclasses.asdict(cfg),
        "resources": None if resources is None else {k: getattr(resources, k) for k in (
            "pipeline", "actors", "max_actors", "cpus_per_actor", "gpus_per_actor", "threads_per_actor")},
        "started_at": dt.datetime.fromtimestamp(getattr(run.lease, "taken_at", run.t_start), dt.timezone.utc
                                                ).isoformat(timespec="milliseconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    summary["config"]["src"], summary["config"]["dst"] = redact(cfg.src), redact(cfg.dst)
    summary["config"]["model"] = redact(cfg.model)
    if signum is not None:
        summary["interrupted"] = signal.Signals(signum).name
    if why is not None:
        summary["stopped"] = why                # DST failed (storage.dst_failure)
    if signum is not None or why is not None:
        summary["not_started"] = plan.listed - sum(counts.values())
        summary["listed_all"] = plan.listing_done       # False: more inputs than ``inputs`` were not listed
    if unrecorded:
        summary["unrecorded"] = unrecorded      # rows DST refused: their inputs are done again by a rerun
    return summary
