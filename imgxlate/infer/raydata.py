"""Every line of the batch job that talks to Ray (Data): the Feed and stop-flag actors on the driver's node, the
datasource of reader tasks, the dataset wiring the stages of :mod:`imgxlate.infer.stages` into one pipeline,
the DataContext settings it runs with, the cluster's resources, and starting or joining Ray. Ray's API calls
are marked `# ray:` (a few use private fields, pinned to Ray 2.58, and are checked where they are read).

    driver: Feeder --put--> Feed actor <--take-- reader tasks (PlanSource) -> load / model / save -> driver
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from imgxlate.infer import heap
from imgxlate.infer.blocks import seal, sealed, unseal
from imgxlate.infer.config import JobError, TranslateConfig, input_format, stage_settings
from imgxlate.infer.stages import NOT_STARTED, FusedStage, ModelStage, load, save
from imgxlate.io import storage
from imgxlate.log import log


def start_ray(cfg: TranslateConfig) -> bool:
    """Join the cluster (RAY_ADDRESS / --ray-address) or start Ray here; True when this call did.
    Credentials are not shipped: workers use their own environment / instance role."""
    from imgxlate import rayenv

    started = rayenv.start_or_join(cfg.ray_address, cfg.num_cpus, storage.forwarded_env())
    try:                                # a local SRC / DST on a cluster: every node must see it (a shared mount)
        for what, uri in (("SRC", cfg.src), ("DST", cfg.dst)):
            path = storage.local_path(uri) if storage.is_local(uri) else None
            if what == "SRC" and path and not os.path.isdir(path) and input_format(cfg) == "files":
                continue                # a manifest file: the driver alone reads it
            if path:
                rayenv.check_shared(path, what, write=what == "DST")
    except BaseException:
        if started:
            shutdown()
        raise
    return started


def shutdown() -> None:
    import ray

    ray.shutdown()                                                                     # ray:


def resolve_resources(cfg: TranslateConfig, fit: bool = False, resources: dict | None = None) -> TranslateConfig:
    """The config with the resources the run gets on this cluster (``resources``: Ray's cluster_resources, read
    here when not given): pipeline mode, actors, max_actors, CPUs / GPUs and threads per actor (the defaults of
    :class:`TranslateConfig` filled in). ``actors`` is the pool's size at start, ``max_actors`` the size it may
    grow to as the cluster adds nodes: on GPUs, by default, as many as the cluster gives (an autoscaling cluster
    may have no GPU node when the run starts); on CPUs, --actors (a fixed pool) unless --max-actors is given.
    ``fit``: a fixed pool of as many actors as the cluster holds now (at least one), for the lost-block retry: a
    node lost mid-run may have left too few for --actors."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()                                            # ray:
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1 if gpus else 0)
    mode = cfg.pipeline if cfg.pipeline != "auto" else ("split" if gpa else "fused")
    if gpa:
        fits = default = max(1, int(gpus / gpa))
    elif mode == "fused":           # the actors do all the work: one per cpus_per_actor
        fits = default = max(1, int(cpus // cfg.cpus_per_actor))
    else:
        fits, default = max(1, int((cpus - cfg.io_cpus) // cfg.cpus_per_actor)), 1
    actors = min(cfg.actors or default, fits) if fit else cfg.actors or default
    if fit:
        actors = top = min(actors, cfg.max_actors or actors)
    elif cfg.max_actors is not None:
        actors, top = min(actors, cfg.max_actors), cfg.max_actors
    else:
        top = None if gpa and cfg.actors is None else actors    # None: no limit but the cluster's
    if not gpa and mode == "fused" and actors * cfg.cpus_per_actor > cpus:
        raise JobError(f"{actors} model actors x {cfg.cpus_per_actor} CPUs need more than the cluster's "
                       f"{cpus:g} CPUs: lower --actors or --cpus-per-actor")
    if not gpa and mode == "split" and actors * cfg.cpus_per_actor > cpus - cfg.io_cpus:
        raise JobError(f"{actors} model actors x {cfg.cpus_per_actor} CPUs leave no CPU for reading and "
                       f"writing on a cluster with {cpus:g} CPUs: lower --actors or --cpus-per-actor")
    threads = cfg.threads_per_actor or max(1, int(cfg.cpus_per_actor))
    return dataclasses.replace(cfg, gpus_per_actor=gpa, actors=actors, max_actors=top, threads_per_actor=threads,
                               pipeline=mode)


def check_gpus(rcfg: TranslateConfig, stop=None) -> None:
    """GPU actors: that torch can use CUDA where they will run, checked by one probe task given the same GPUs
    before the pipeline starts (a CUDA build the nodes' driver cannot run would otherwise fail every actor, or,
    before, run the model on one CPU thread). JobError, one line, when it cannot. On an autoscaling cluster the
    probe waits for the first GPU node, as the actors would."""
    import ray

    if not rcfg.gpus_per_actor:
        return
    probe = ray.remote(num_cpus=0, num_gpus=rcfg.gpus_per_actor, max_retries=0)(_cuda_problem).remote()  # ray:
    t0 = said = time.monotonic()
    while not ray.wait([probe], timeout=1)[0]:                                         # ray:
        if stop is not None and ray.get(stop.is_set.remote()):          # drained (a signal) while waiting
            ray.cancel(probe, force=True)                                              # ray:
            return
        if time.monotonic() - said >= 60:
            said = time.monotonic()
            log(f"waiting for a node with {rcfg.gpus_per_actor:g} free GPU(s) ({said - t0:.0f} s; an autoscaling "
                f"cluster adds one)")
    if problem := ray.get(probe):                                                      # ray:
        raise JobError(f"--gpus-per-actor {rcfg.gpus_per_actor:g}: {problem}. Install the torch build that matches "
                       f"the GPU nodes' NVIDIA driver (a CUDA 13 build needs driver 580 or later; see cluster/), or "
                       f"run on CPUs with --gpus-per-actor 0")


def _cuda_problem() -> str:
    """Runs on a GPU node, given the actors' GPUs: '' when torch can use CUDA there, else why not."""
    from imgxlate.infer.predictor import cuda_problem

    return cuda_problem()


def check_precision(rcfg: TranslateConfig, meta: dict) -> None:
    """The precision resolved before Ray started (config.model_info) against the actors the cluster gives: fp16 needs
    GPU actors (JobError); a choice made for CPUs that get GPUs, or the reverse, is kept (one precision a run) and
    said."""
    kind = "cuda" if rcfg.gpus_per_actor else "cpu"
    if meta["precision"] == "fp16" and kind == "cpu":
        raise JobError("--amp fp16 runs on GPUs only, and this run's model actors get none: give --amp bf16 or auto, "
                       "or --gpus-per-actor on a cluster with GPUs")
    if meta.get("device_kind", kind) != kind:
        log(f"precision {meta['precision']} was chosen for {meta['device_kind']} actors ({meta['precision_reason']}) "
            f"but the actors run on {kind}s: kept for the whole run; give --gpus-per-actor to choose for them")


def on_this_node(cls):
    """An actor of ``cls`` on the driver's node (0 CPUs): the Feed and the stop flag live and die with the
    driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)   # ray:
    return ray.remote(num_cpus=0, scheduling_strategy=here)(cls).remote()                         # ray:


class StopFlag:
    """An actor, set when the driver is asked to stop (SIGTERM / SIGINT): read tasks stop starting new inputs."""

    def __init__(self):
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


_stop_seen = {"flag": None, "at": 0.0, "value": False}      # per worker process, for the run of that flag


class StopCheck:
    """What the stages are given to ask whether the run is draining: asks the :class:`StopFlag` actor at most
    once a second per worker process (a process reused by a later run in the same Ray session asks that run's
    flag)."""

    def __init__(self, flag):
        self.flag = flag                # an actor handle

    def is_set(self) -> bool:
        seen = _stop_seen
        if seen["flag"] != self.flag:
            seen.update(flag=self.flag, at=0.0, value=False)
        if not seen["value"] and time.monotonic() - seen["at"] > 1.0:
            import ray

            seen["value"], seen["at"] = ray.get(self.flag.is_set.remote()), time.monotonic()   # ray:
        return seen["value"]


def _actor_ids() -> tuple[str, str]:
    import ray

    ctx = ray.get_runtime_context()                                                    # ray:
    return ctx.get_node_id(), ctx.get_worker_id()


def configured(stage: type, settings: dict) -> type:
    """``stage`` taking and returning sealed blocks, with its settings in the class itself: they travel with the
    actor's definition, not as constructor arguments in the object store (which a restarted actor could lose,
    and which Ray warns about on every run)."""
    return type(stage.__name__, (stage,), {"__init__": lambda self: stage.__init__(self, **settings,
                                                                                    where=_actor_ids()),
                                           "__call__": lambda self, block: seal(stage.__call__(self, unseal(block)))})




class Feed:
    """An actor between the driver and the pipeline: the driver puts sealed input blocks in as the plan's shards
    become ready; PlanSource's readers take them. One dataset serves the whole run, however long the listing
    goes on, and the model actors stay loaded from the first block to the last. Input blocks are small (names,
    not pixels) and travel by value: inline in the calls when under Ray's inline limit (100 KB), through the
    object store when over it.
    Async: a reader's ``take`` waits for a block without holding the actor."""

    def __init__(self):
        self.blocks: collections.deque = collections.deque()   # (sealed block, rows)
        self.queued = 0
        self.closed = False
        self.changed = None                                   # an asyncio.Event, made on the actor's loop

    def _event(self):
        import asyncio

        if self.changed is None:
            self.changed = asyncio.Event()
        return self.changed

    async def put(self, blocks: list) -> int:
        """``blocks``: [(sealed block, rows)]. Returns the rows queued. Once closed (a drain), blocks are ignored."""
        for block, rows in blocks if not self.closed else []:
            self.blocks.append((block, rows))
            self.queued += rows
        self._event().set()
        return self.queued

    async def close(self, drop: bool = False) -> int:
        """No more blocks: readers end once the queue is empty (``drop``: at once; a drain's queued inputs are
        left for the next run). Returns the rows dropped."""
        self.closed = True
        dropped = self.queued if drop else 0
        if drop:
            self.blocks.clear()
            self.queued = 0
        self._event().set()
        return dropped

    async def take(self, wait_s: float = 1.0):
        """[the next sealed block], waiting up to ``wait_s`` for one ([] when none came); None once closed and
        empty."""
        import asyncio

        if not self.blocks and not self.closed:
            ev = self._event()
            ev.clear()
            try:
                await asyncio.wait_for(ev.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        if self.blocks:
            block, rows = self.blocks.popleft()
            self.queued -= rows
            return [block]
        return None if self.closed else []


def _pull(feed):
    import ray

    while (got := ray.get(feed.take.remote())) is not None:                           # ray:
        if got:
            yield got[0]                  # a sealed block


def plan_source(feed, readers: int):
    """A Ray Data datasource of ``readers`` read tasks, each pulling blocks from ``feed`` until it is closed."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask  # ray: Ray Data's datasource API

    class PlanSource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(lambda: _pull(feed), meta) for _ in range(readers)]

    return PlanSource()


def bounded_block_stats():
    """A Ray Data execution callback class that keeps the per-block stats of each operator bounded.

    Ray Data keeps one stats record per output block of every operator for the dataset's whole life
    (ray-project/ray#66016, open in Ray 2.58). The job runs one dataset for the whole run, so a billion tiny
    inputs would be millions of blocks, and the driver would grow with every one of them. The records only feed
    the stats summary Ray Data logs at the end; after each execution step, each operator keeps its last ``KEEP``."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback  # ray: internal hook

    class BoundedBlockStats(ExecutionCallback):
        KEEP = 1000

        def on_execution_step(self, executor) -> None:
            for op in getattr(executor, "_topology", None) or ():        # ray: private fields, checked
                stats = getattr(op, "_output_blocks_stats", None)
                if isinstance(stats, list) and len(stats) > 2 * self.KEEP:
                    del stats[:-self.KEEP]

    return BoundedBlockStats


def build(feed, cfg, model_meta: dict, stop=None):
    """The lazy Ray Dataset of the run: sealed input blocks (manifest-schema tables: source_uri, key, output_uri,
    shard, attempt, run_id, recipe; see :mod:`imgxlate.infer.plan`) come from ``feed`` (a :class:`Feed` actor
    handle); sealed manifest rows come out. ``stop``: a :class:`StopFlag` actor handle; once set, no new input is
    read."""
    import ray

    stop = None if stop is None else StopCheck(stop)
    # Every block is one sealed row, and a target block size of 1 byte makes Ray Data pass each on as it is made
    # (by default a reader's blocks are merged up to 128 MB first, which would hold a streamed plan back). The
    # caller sets DataContext.target_max_block_size = 1 (see :func:`stream`).
    # Readers only pass blocks on (0 CPUs: an actor pool that takes every CPU must not starve them). They are not
    # retried: a block taken from the Feed cannot be taken again, so a reader that died lost its block, and the
    # driver retries the inputs of lost blocks one at a time after the run (see job.retry_lost).
    readers = min(16, max(2, 2 * (cfg.max_actors or cfg.actors)))
    ds = ray.data.read_datasource(plan_source(feed, readers), override_num_blocks=readers,      # ray:
                                  ray_remote_args={"num_cpus": 0, "max_retries": 0})
    load_kw, save_kw, settings = stage_settings(cfg, model_meta, stop)
    settings.update(gpus=cfg.gpus_per_actor, in_actor=True)
    actor_kw = dict(
        # a fixed pool, or one that grows to max_actors (None: no limit but the cluster's) as nodes join
        compute=ray.data.ActorPoolStrategy(min_size=cfg.actors, max_size=cfg.max_actors),       # ray:
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
        scheduling_strategy="SPREAD",             # model actors over as many nodes as there are

        # A killed actor is replaced and its batch retried, up to max_model_retries times: a batch that kills
        # every actor it reaches is dropped after that, and the driver gives its inputs model_error rows.
        max_restarts=-1, max_task_retries=cfg.max_model_retries,
    )
    # Each call takes one input block (sized by bytes in the plan); the model runs batch_size images at a time.
    # ray: the stages as Ray Data operators (map_batches), a block per call
    if cfg.pipeline == "fused":
        return ds.map_batches(configured(FusedStage, {**settings, "load_kw": load_kw, "save_kw": save_kw}),
                              batch_format="pyarrow", batch_size=1, **actor_kw)
    ds = ds.map_batches(sealed(load), batch_format="pyarrow", batch_size=1, num_cpus=cfg.io_cpus,
                        fn_kwargs={**load_kw, "stop": stop})
    ds = ds.map_batches(configured(ModelStage, settings), batch_format="pyarrow", batch_size=1, **actor_kw)
    return ds.map_batches(sealed(save), batch_format="pyarrow", batch_size=1, num_cpus=cfg.io_cpus,
                          fn_kwargs=save_kw)


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
    ray.get([feed.put.remote(c) for c in calls if c])                                # ray:


def stream(cfg: TranslateConfig, feed, meta: dict, stop, on_rows, after_batch=None, fit: bool = False
           ) -> TranslateConfig:
    """Run the Ray Data pipeline over the input blocks put in ``feed`` until it is closed, handing each block's
    manifest rows (a pyarrow Table, without the not-started ones) to ``on_rows(rows, returned)`` with the number
    of rows that came back (not-started included), then calling ``after_batch()`` (the driver checks its lease
    there). ``fit``: as many actors as the cluster holds now, up to --actors (see :func:`resolve_resources`).
    Returns the config with the resources it ran with."""
    import ray.data

    rcfg = resolve_resources(cfg, fit)
    from imgxlate import rayenv

    if cfg.gpus_per_actor is None and not rcfg.gpus_per_actor and rayenv.cluster_address(cfg.ray_address):
        log("the cluster has no GPU now: CPU model actors (an autoscaling cluster adds GPU nodes for "
            "--gpus-per-actor 1 only)")
    check_precision(rcfg, meta)
    check_gpus(rcfg, stop)
    # A normal run shows imgxlate's own progress; Ray Data's notices stay in Ray's session logs. Everything set
    # here is set back after the run, for a caller's own pipelines in the same process (imgxlate.translate).
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()                                           # ray:
    names = ("enable_progress_bars", "print_on_execution_start", "max_errored_blocks", "target_max_block_size",
             "custom_execution_callback_classes")
    saved, order = {n: getattr(ctx, n) for n in names}, ctx.execution_options.preserve_order      # ray:
    try:
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.execution_options.preserve_order = False
        ctx.max_errored_blocks = -1             # a batch that failed every retry is dropped; the caller gives rows
        ctx.target_max_block_size = 1                                   # ray: see build
        ctx.custom_execution_callback_classes = [*saved["custom_execution_callback_classes"],
                                                 bounded_block_stats()]                 # ray: flat memory
        # prefetch_batches=0: a block is handed over as soon as it is done, not when the next one is
        for batch in build(feed, rcfg, meta, stop).iter_batches(batch_format="pyarrow", batch_size=None,
                                                                prefetch_batches=0):   # ray:
            batch = unseal(batch)
            on_rows(batch.filter(pc.not_equal(batch.column("status"), NOT_STARTED)), batch.num_rows)
            if after_batch is not None:
                after_batch()
            heap.trim()
    finally:
        for n, v in saved.items():
            setattr(ctx, n, v)
        ctx.execution_options.preserve_order = order
        logger.setLevel(level)
    return rcfg
