"""The driver's side of the pipeline's input: :func:`take` hands out the plan's ready shards (its errors as
JobError), and the :class:`Feeder` thread puts their input blocks in the Feed while the listing goes on."""

from __future__ import annotations

import threading
import time

import pyarrow as pa

from imgxlate.infer import raydata
from imgxlate.infer.config import JobError, TranslateConfig, destination_problem
from imgxlate.infer.plan import PlanError, Planner, Shard
from imgxlate.infer.run import Run
from imgxlate.io import listing
from imgxlate.io.listing import redact
from imgxlate.log import log


def take(cfg: TranslateConfig, p: Planner, max_inputs: int, timeout: float | None = None) -> list[Shard] | None:
    """The next ready shards (see :meth:`Planner.take`), with the plan's errors as JobError."""
    try:
        return p.take(max_inputs, timeout)
    except PlanError as e:
        if e.where == "destination":
            raise JobError(destination_problem(cfg.dst, e.error, "read")) from e
        if isinstance(e.error, listing.SourceError):
            raise JobError(str(e.error)) from e
        if e.where == "source":
            raise JobError(f"source {redact(cfg.src)} cannot be listed: {type(e.error).__name__}: "
                           f"{e.error}") from e
        raise


class Feeder(threading.Thread):
    """The driver's side of the Feed: takes ready shards from the plan, records them in the book and puts their
    input blocks in the Feed while fewer than ``queued_inputs`` inputs are in flight (put in, not yet back from
    the pipeline: Ray Data's own backpressure is by bytes, and input blocks are only names, so it would read a
    whole listing ahead); closes the Feed when the plan is done (``done``). An error of the plan is kept in
    ``error``, and the Feed is closed so that the pipeline finishes what it has and ends."""

    STALL_S = 60.0          # nothing came back for this long while full: let one more shard in (a lost block's
                            # inputs never come back, and must not hold the run forever)

    def __init__(self, run: Run, feed, first: list[Shard] = ()):
        """``first``: shards taken already, put in first (in this thread, so that the driver starts the pipeline
        meanwhile: putting them waits for the Feed actor to start, as the pipeline waits for its model actors)."""
        super().__init__(name="imgxlate-feeder", daemon=True)
        self.ctx, self.feed, self.first = run, feed, list(first)
        self.stopping = threading.Event()
        self.pushed = self.returned = 0
        self.last_back = time.monotonic()
        self.done = False
        self.error: BaseException | None = None

    def on_rows(self, rows: pa.Table, returned: int) -> None:
        """A block came back from the pipeline: its manifest ``rows``, of ``returned`` rows (not_started
        included)."""
        if rows.num_rows:
            self.ctx.add(rows)
        self.returned += returned
        self.last_back = time.monotonic()

    def push(self, shards: list[Shard]) -> None:
        blocks = []
        for shard in shards:
            with self.ctx.lock:
                self.ctx.book.add_shard(shard)
                self.ctx.progress.update(self.ctx.book.counts)
            if self.stopping.is_set():          # drained: recorded as listed, not started
                continue
            blocks += shard.blocks
            self.pushed += shard.todo
        raydata.put_blocks(self.feed, blocks)

    def run(self) -> None:
        cap = self.ctx.cfg.queued_inputs
        try:
            self.push(self.first)
            self.first = []
            while not self.stopping.is_set():
                self.ctx.check_lease()
                room = cap - (self.pushed - self.returned)
                if room <= 0 and time.monotonic() - self.last_back < self.STALL_S:
                    time.sleep(0.1)
                    continue
                shards = take(self.ctx.cfg, self.ctx.plan, max(1, room), timeout=0.5)
                if shards is None:
                    self.done = True
                    break
                if room <= 0 and any(sh.todo for sh in shards):
                    self.last_back = time.monotonic()       # one shard with work per stall
                self.push(shards)
        except BaseException as e:
            self.error = e
            if not self.stopping.is_set():
                log(f"{e}: finishing the inputs already queued, then stopping")
        finally:
            if not self.stopping.is_set():
                self.feed.close.remote()        # readers end once the Feed is empty

    def raise_if_incomplete(self, ray_log: str) -> None:
        """After the pipeline ended, undrained: the plan's error, or an error when not every input was handed to
        the pipeline (e.g. the Feed actor died: the readers ended early)."""
        if self.error is not None:
            raise self.error
        if not self.done:
            raise JobError("the pipeline ended before every input was handed to it (see Ray's messages in "
                           f"{ray_log}); a rerun goes on from what was recorded")
