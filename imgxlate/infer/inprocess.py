"""A small run without Ray: the job's own stages (:class:`~imgxlate.infer.stages.FusedStage`: read, decode, model,
encode, write) called in the driver's process, block by block, with the same plan, book, lease, drain and summary
as a run on Ray. Starting Ray and its actors costs 20-25 s on a 2-CPU machine (ray.init, then each actor
importing torch and loading the model), which a run of a few photos never earns back; in this process the first
output comes a few seconds after the command (3.6 s for the quickstart's photos, against 23-29 s on Ray).
``--pipeline auto`` takes this path for a run that

- joins no cluster (no --ray-address, no RAY_ADDRESS, as `ray job submit` sets, and no Ray already started in this
  process, as in a notebook that called ray.init or a test session),
- runs on CPUs (a GPU machine keeps the split pipeline, whose codecs run beside the model),
- is small: listed in full when its first shard is ready, at most :data:`MAX_INPUTS` inputs and
  :data:`MAX_SOURCE_BYTES` of sources, every size known (on 2 CPUs, Ray's start-up is then a large share of it),
- and follows no in-process run of this DST that was killed (a run folder with :data:`MARK` and no summary): an
  input that kills its process (out of memory) would kill every rerun too, where on Ray it ends as a row.

``--pipeline in-process`` asks for it whatever the size; ``fused`` or ``split`` always run on Ray. Design notes:
imgxlate/infer/DESIGN.md, "Small runs in this process"."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import pyarrow as pa
import pyarrow.compute as pc

from imgxlate.infer import heap
from imgxlate.infer.blocks import unseal
from imgxlate.infer.book import failed_rows
from imgxlate.infer.config import TranslateConfig, stage_settings
from imgxlate.infer.feeder import take
from imgxlate.infer.plan import Shard
from imgxlate.infer.run import Run
from imgxlate.infer.stages import NOT_STARTED
from imgxlate.io import manifest, storage
from imgxlate.io.listing import redact_text
from imgxlate.log import log

MAX_INPUTS = 10_000             # 10k 32-64 px PNGs: 23 s here (a block per CPU), 38 s on Ray (jobs/RESULTS.md)
MAX_SOURCE_BYTES = 64 << 20
SMALL_INPUT_BYTES = 64 << 10   # inputs averaging at most this run a block per CPU (see workers)
LARGE_BLOCKS = 2                # larger inputs run this many blocks at once at most (see workers)
MARK = "IN_PROCESS"             # in an in-process run's manifest folder, from its start


def chosen(run: Run, first: list) -> str | None:
    """Why this run goes in-process (for the log), or None when it runs on Ray. While it waits for the listing's
    end it takes the shards that become ready into ``first`` (a folder of tars or Parquet files is a shard each,
    and the listing waits for room for more)."""
    cfg, plan = run.cfg, run.plan
    if cfg.pipeline == "in-process":
        return "--pipeline in-process"
    if cfg.pipeline != "auto" or cfg.ray_address or os.environ.get("RAY_ADDRESS") or cfg.gpus_per_actor \
            or run.meta["device_kind"] != "cpu" or cfg.actors is not None or cfg.max_actors is not None:
        return None
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return None
    deadline = time.monotonic() + 1.0           # a listing that fitted in the first shard ends right after it (a
    while not plan.listing_done and time.monotonic() < deadline and plan.listed <= MAX_INPUTS \
            and plan.source_bytes <= MAX_SOURCE_BYTES:      # tar's index on busy CPUs: longer); a large one goes
        for shard in plan.take(MAX_INPUTS, 0.005) or []:    # on past the limits at once
            (first.append if shard.todo else run.book.add_shard)(shard)
    if not plan.listing_done or plan.listed > MAX_INPUTS or plan.source_bytes > MAX_SOURCE_BYTES \
            or plan.unknown_sizes:
        return None
    if killed := killed_runs(cfg.dst):
        log(f"run {killed[-1]} ran in its driver's process and was killed (out of memory?): this run starts Ray, "
            f"where an input that kills its process gets a model_error row")
        return None
    return (f"a small run ({plan.listed} inputs, {plan.source_bytes / 1e6:.1f} MB) runs in this process without "
            f"Ray; --pipeline fused runs it on Ray")


def killed_runs(dst: str) -> list[str]:
    """Runs of DST that ran in their driver's process and have no summary (killed), oldest first."""
    import posixpath

    fs, root = storage.filesystem(manifest.manifest_root(dst))
    try:
        marked = fs.glob(posixpath.join(root, "*", MARK), detail=True)
    except FileNotFoundError:
        return []
    if not marked:
        return []
    done = {posixpath.dirname(p) for p in fs.glob(posixpath.join(root, "*", "summary.json"))}
    return manifest.in_order(fs, {p: info for p, info in marked.items() if posixpath.dirname(p) not in done})


def cpus() -> int:
    """This process's CPUs: its affinity, within a cgroup v2 CPU quota (a container's limit), as Ray counts them."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


class _Draining:
    """What the stages ask whether the run is draining (a signal, a lost lease, DST failing): the run's drain."""

    def __init__(self, run: Run):
        self.run = run

    def is_set(self) -> bool:
        self.run.check_lease()                  # a lost lease drains the run as a SIGTERM would, mid-block too
        return self.run.drain.stopping

    def halted(self) -> bool:                   # a second signal: a model in a worker thread stops between rows
        return self.run.drain.hard              # of tiles (its block writes nothing and gets no row)


def workers(cfg: TranslateConfig, plan, threads: int) -> int:
    """Blocks run at once in this process, in threads, the CPUs shared out over them (:func:`thread_shares`). One per
    CPU when the inputs are small (on average at most :data:`SMALL_INPUT_BYTES`): their per-input work around the
    model (read, decode, encode, checksum, write, the row) is most of their time and is serial in one thread, and
    torch does not split ops that small over threads anyway. Larger inputs run :data:`LARGE_BLOCKS` at once: on 2
    CPUs two 3000x2000 photos of one thread each ran at 0.169 img/s where one on both threads ran at 0.137 (one
    thread's encode and write overlap the other's model, and torch's two threads spend more CPU time on the same
    tiles), and no more than that many blocks (1 MB of sources each at most) are in memory whatever the CPUs. A
    second Ctrl-C stops a block's model between rows of tiles and between model calls (:class:`_Draining`.halted;
    a block being encoded and written finishes). One block also under --compile (a compiled model is called
    from one thread) or --threads-per-actor."""
    if threads < 2 or cfg.compile or cfg.threads_per_actor or not plan.listed:
        return 1
    small = plan.source_bytes <= SMALL_INPUT_BYTES * plan.listed
    return min(threads, plan.listed, threads if small else LARGE_BLOCKS)


def stream(run: Run, first: list[Shard]) -> TranslateConfig:
    """Every shard of the plan (``first``, the ones taken already, then the rest) through the stages here, the
    rows into the book as each block is done (:func:`workers` blocks at once, in threads); stops taking inputs
    once the run drains. Returns the config with the resources it ran with (pipeline 'in-process', the workers
    as its actors)."""
    import torch

    from imgxlate.infer import raydata
    from imgxlate.infer.stages import FusedStage
    from imgxlate.infer.tiling import Halted

    cfg = run.cfg
    threads = cfg.threads_per_actor or cfg.num_cpus or cpus()
    n = workers(cfg, run.plan, threads)
    rcfg = dataclasses.replace(cfg, pipeline="in-process", actors=n, max_actors=n, gpus_per_actor=0,
                               cpus_per_actor=float(threads) / n, threads_per_actor=thread_shares(threads, n)[0])
    raydata.check_precision(rcfg, run.meta)     # (fp16 needs a GPU: refused as on Ray)
    load_kw, save_kw, settings = stage_settings(rcfg, run.meta, _Draining(run))
    heap.compute()                              # (a caller's process may have run a run on Ray before)
    saved_threads = torch.get_num_threads()     # a caller's process (imgxlate.translate) gets its own back
    with contextlib.suppress(Exception):        # (killed_runs; a DST that fails here fails the outputs' writes)
        storage.write_bytes(_mark(run), b"")
    pending: set[Future] = set()               # blocks in flight
    shares = iter(thread_shares(threads, n))    # (3 CPUs, 2 blocks: 2 + 1 threads)
    pool = ThreadPoolExecutor(n, thread_name_prefix="imgxlate-block", initializer=_torch_threads,
                              initargs=(shares,)) if n > 1 else None

    def start(block) -> None:                   # one worker: the block runs here, where a 2nd Ctrl-C stops it
        args = (stage, unseal(block), run.meta)
        if pool is None:
            record(_rows(*args))
            return after_blocks()
        pending.add(pool.submit(_rows, *args))
        while len(pending) >= n:
            finish_some()

    def record(rows: pa.Table) -> None:         # (an input the drain kept from starting gets no row)
        rows = rows.filter(pc.not_equal(rows.column("status"), NOT_STARTED))
        if rows.num_rows:
            run.add(rows)

    def after_blocks() -> None:
        run.check_lease()
        heap.trim()

    def finish_some() -> None:
        """Record the blocks that have ended, waiting for one: whichever it is, so that a worker whose block
        ended first starts its next one at once (waiting for the oldest kept it idle)."""
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:                        # out of pending before it is recorded: if recording raises, the
            pending.discard(fut)                # finally below records the others, never this one twice (a rerun
            record(fut.result())                # redoes an input without a row; a row twice would count it twice)
        after_blocks()

    try:
        try:
            stage = FusedStage(load_kw, save_kw, **settings, gpus=0, where=(None, f"in-process-{os.getpid()}"))
            shards = first
            while shards is not None and not run.drain.stopping:
                for shard in shards:
                    with run.lock:
                        run.book.add_shard(shard)
                        run.progress.update(run.book.counts)
                    for block, _ in shard.blocks:
                        if run.drain.stopping:  # the shard's other inputs get no row: the next run does them
                            break
                        start(block)
                shards = take(cfg, run.plan, cfg.queued_inputs, timeout=0.5) if not run.drain.stopping else None
            while pending:
                finish_some()
        finally:
            if pool:                            # blocks in flight end (a drain stops them between inputs, a 2nd
                pool.shutdown(wait=True)        # signal between rows of tiles) and their rows are recorded if the
                                                # book takes them
            for fut in pending:
                with contextlib.suppress(Exception, Halted):     # (halted: wrote nothing, no row)
                    record(fut.result())
    finally:
        torch.set_num_threads(saved_threads)
        run.book.flush_all()                    # rows of outputs already written are recorded, whatever happens
    if not run.drain.stopping and run.book.failure is None:
        _no_input_without_a_row(run)
    return rcfg


def _mark(run: Run) -> str:
    return storage.join(manifest.manifest_root(run.cfg.dst), run.run_id, MARK)


def unmark(run: Run) -> None:
    """Take the run's mark away: a second Ctrl-C stopped it without a summary, but it was not killed, so the next
    auto run of DST may run in this process too (a failure to delete keeps the mark: that run goes to Ray)."""
    with contextlib.suppress(Exception):
        fs, path = storage.filesystem(_mark(run))
        fs.rm_file(path)


def thread_shares(threads: int, n: int) -> list[int]:
    """Torch threads of each of ``n`` blocks run at once on ``threads`` CPUs: all of them, as evenly as can be."""
    return [max(1, threads // n + (i < threads % n)) for i in range(n)]


def _torch_threads(shares) -> None:
    """A block thread's own torch threads (OpenMP's count is per thread). Asked first: a thread's first parallel
    op sets its count to the process's last set_num_threads, which would undo a count set before it."""
    import torch

    torch.get_num_threads()
    torch.set_num_threads(next(shares))


def _no_input_without_a_row(run: Run) -> None:
    """Every input of a finished run has a row: one no stage returned a row for (never expected) gets a
    model_error row, as the lost-block retry gives one on Ray."""
    lost = run.book.missing()
    if lost:
        run.add(failed_rows(run.meta, lost, "no stage returned a row for this input (a bug: please report it)"))
        run.book.flush_all()


def _rows(stage, block: pa.Table, meta: dict) -> pa.Table:
    """The block's manifest rows. A stage that raises (a bug: the stages turn an input's failures into rows) is
    tried again one input at a time, as the Ray path's lost-block retry does, so that one input cannot take its
    block with it; an input it fails alone gets a model_error row."""
    try:
        return stage(block)
    except Exception as e:
        if block.num_rows == 1:
            return failed_rows(meta, block.to_pylist(), redact_text(f"{type(e).__name__}: {e}"))
        return pa.concat_tables([_rows(stage, block.slice(i, 1), meta) for i in range(block.num_rows)])
