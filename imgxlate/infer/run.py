"""One run of the batch job as an object: :class:`Run` holds what every part of a run shares (its config, the
model's identity, run id, lease, plan, book, progress line and signal drain), made once by :func:`job.run`
and handed to the Feeder, the pipeline's callbacks and the summary, instead of the same eight arguments
passed hand to hand. Also here: how a run is stopped (signals, a lost lease, DST failing) and its progress
line."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from imgxlate.errors import SecondSignal, Stopped
from imgxlate.infer.book import ShardBook
from imgxlate.infer.config import TranslateConfig
from imgxlate.infer.plan import Planner
from imgxlate.io import storage
from imgxlate.io.lease import Lease
from imgxlate.log import log

DST_FAILED_EXIT = 75        # EX_TEMPFAIL (sysexits.h): DST failed; once it is fixed, a rerun finishes the run


class Interrupted(Stopped, RuntimeError):
    """SIGTERM / SIGINT: the run drained (what was written is recorded) and stopped; ``summary`` says so."""

    def __init__(self, signum: int, summary: dict):
        super().__init__(f"stopped by {signal.Signals(signum).name}: {not_started(summary)}",
                         summary["not_started"], 128 + signum)
        self.summary = summary


class DstFailed(Stopped, RuntimeError):
    """DST failed (full, over quota, read-only, an I/O error, a store failing after retries): the run drained as on
    a signal and stopped; ``summary`` says why (``stopped``) and what is left."""

    def __init__(self, summary: dict):
        counts, why = summary["counts"], summary["stopped"]
        lost = summary.get("unrecorded", 0)
        msg = (f"stopped: {why} ({summary['dst']}): {counts.get('ok', 0)} outputs written"
               + (f", {counts['write_error']} writes failed" if counts.get("write_error") else "")
               + (f"; {lost} of these rows could not be recorded (a rerun does their inputs again)" if lost else "")
               + f"; {not_started(summary)}")
        super().__init__(msg, summary["not_started"], DST_FAILED_EXIT, f"{advice(why)} and rerun the same command "
                                                                      f"to finish")
        self.summary = summary


def not_started(summary: dict) -> str:
    """'N inputs not started', 'at least N' when SRC was not listed to its end (a drain stops the listing)."""
    return ("" if summary.get("listed_all", True) else "at least ") + f"{summary['not_started']} inputs not started"


def advice(why: str) -> str:
    """What to do about DST, for a :func:`storage.dst_failure` reason."""
    for word, what in (("space", "free space on DST"), ("quota", "free space or raise the quota on DST"),
                       ("read-only", "make DST writable"), ("I/O", "check DST's disk"),
                       ("store", "check the store (its quota, its health)")):
        if word in why:
            return what
    return "fix DST"


def dst_failure_in(rows: pa.Table) -> str | None:
    """The reason of the first row whose error says that DST itself failed (:data:`storage.DST_FAILURE`)."""
    if "error" not in rows.column_names or not rows.num_rows:
        return None
    errors = rows.column("error")
    hit = errors.filter(pc.fill_null(pc.starts_with(errors, storage.DST_FAILURE), False))
    return hit[0].as_py()[len(storage.DST_FAILURE):].split(": ", 1)[0] if len(hit) else None


class SignalDrain:
    """While active, the first SIGTERM / SIGINT starts a drain (``on_signal``); a second one stops at once.
    :meth:`stop` starts the same drain for another reason (DST failed)."""

    def __init__(self, on_signal):
        self.on_signal, self.signum, self._old = on_signal, None, {}
        self.reason: str | None = None
        self.hard = False                       # a second signal came: the model in a thread stops too

    @property
    def stopping(self) -> bool:
        return self.signum is not None or self.reason is not None

    def stop(self, reason: str) -> None:
        """Drain the run as a first signal would, for ``reason``; nothing when it is draining already."""
        if self.stopping:
            return
        self.reason = reason
        log(f"{reason}: stopping: no new inputs are started; the outputs in flight are finished and recorded")
        self.on_signal()

    def _handle(self, signum, frame):
        if self.hard:                           # a third: what is in flight is being stopped and recorded
            return
        if self.signum is not None:
            self.hard = True
            raise SecondSignal(signum)
        self.signum = signum
        log(f"{signal.Signals(signum).name}: draining: no new inputs are started; the outputs in flight are "
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
        log(f"{n}/{listed} images  {rate:.2f} img/s  ok {counts['ok']}  skipped (done before) {skipped}"
             f"  failed {failed}  ETA {eta_s}")


@dataclass(frozen=True)
class Run:
    """The state one run shares between the driver's main thread, the Feeder thread and the pipeline's
    callbacks. ``lock`` guards ``book`` and ``progress`` (the Feeder adds shards while rows come back)."""

    cfg: TranslateConfig
    meta: dict                   # the model: model_id, sha256, task, scale (config.model_info)
    run_id: str
    t_start: float
    lease: Lease
    plan: Planner
    book: ShardBook
    progress: Progress
    drain: SignalDrain
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rows: pa.Table) -> None:
        """Manifest rows back from the pipeline: into the book, and the progress line. A row that says DST failed,
        or a manifest part DST refused, stops the run (:meth:`SignalDrain.stop`)."""
        with self.lock:
            self.book.add(rows)
            self.progress.update(self.book.counts)
        why = dst_failure_in(rows) or self.book.failure
        if why is not None:
            self.drain.stop(why)

    def check_lease(self) -> None:
        """A lost lease (taken over, or not renewed in time) drains the run as a SIGTERM would."""
        if self.lease.lost and not self.drain.stopping:
            self.drain.signum = signal.SIGTERM
            log("the lease on DST was lost (taken over, or not renewed in time): stopping")
            self.drain.on_signal()
