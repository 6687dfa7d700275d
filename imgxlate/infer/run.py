"""One run of the batch job as an object: :class:`Run` holds what every part of a run shares (its config, the
model's identity, run id, lease, plan, book, progress line and signal drain), made once by :func:`job.run`
and handed to the Feeder, the pipeline's callbacks and the summary, instead of the same eight arguments
passed hand to hand. Also here: how a run is stopped (signals, a lost lease) and its progress line."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from imgxlate.errors import Stopped
from imgxlate.infer.book import ShardBook
from imgxlate.infer.config import TranslateConfig
from imgxlate.infer.plan import Planner
from imgxlate.io.lease import Lease
from imgxlate.log import log


class Interrupted(Stopped, RuntimeError):
    """SIGTERM / SIGINT: the run drained (what was written is recorded) and stopped; ``summary`` says so."""

    def __init__(self, signum: int, summary: dict):
        super().__init__(f"stopped by {signal.Signals(signum).name}", signum, summary["not_started"])
        self.summary = summary


class SignalDrain:
    """While active, the first SIGTERM / SIGINT starts a drain (``on_signal``); a second one stops at once."""

    def __init__(self, on_signal):
        self.on_signal, self.signum, self._old = on_signal, None, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without draining")
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
        """Manifest rows back from the pipeline: into the book, and the progress line."""
        with self.lock:
            self.book.add(rows)
            self.progress.update(self.book.counts)

    def check_lease(self) -> None:
        """A lost lease (taken over, or not renewed in time) drains the run as a SIGTERM would."""
        if self.lease.lost and self.drain.signum is None:
            self.drain.signum = signal.SIGTERM
            log("the lease on DST was lost (taken over, or not renewed in time): stopping")
            self.drain.on_signal()
