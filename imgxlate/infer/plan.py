"""The batch job's plan, as a stream: list SRC page by page, cut the inputs into shards, and decide per shard
what is left to do from its marker (see :mod:`imgxlate.io.manifest`).

    listing (paged; S3 in parallel key ranges) -> shards of ~10,000 inputs -> per shard: output keys, resume
    -> a bounded queue of ready shards, which the job takes in waves while the listing goes on

A shard is the unit of key assignment, of manifest parts and of resume. Output keys are unique within a shard
by construction (:func:`imgxlate.io.listing.output_keys`); across shards they are unique because a cut is only
made where no two inputs on either side could ever get the same key: rival inputs share their folder and their
name up to its first '.', i.e. a key prefix, and the listing yields every key with a given prefix in one run.
Keys that the listing may not yield next to their rivals (a key with '//' or './' in it, or under _manifest/)
are set aside into a last shard, and the non-canonical ones among them get hashed names.

Only the current shard's inputs and a few ready shards are in memory, whatever the number of inputs.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from imgxlate.io import codec, listing, manifest, storage
from imgxlate.io.listing import Item, redact

SHARD_SIZE = 10_000
BLOCK_ROWS = 32          # inputs per Ray Data block: the unit a read task takes


@dataclass
class Shard:
    id: str
    n: int                      # inputs in the shard
    blocks: list[pa.Table]      # the inputs to send through the pipeline, BLOCK_ROWS a table (rows with a status
                                # set, e.g. a refused key, pass through untouched)
    skipped: int = 0            # inputs already done by an earlier run: no row, counted as skipped_done
    prev_parts: list[str] = field(default_factory=list)   # earlier runs' parts holding this shard's rows
    prev_ok: int = 0

    @property
    def todo(self) -> int:
        return sum(b.num_rows for b in self.blocks)


def group_prefix(key: str) -> str:
    """The prefix every possible rival of ``key`` starts with: its folder and its name up to the first '.'."""
    folder, _, name = key.rpartition("/")
    return (folder + "/" if folder else "") + name.split(".", 1)[0] + "."


def canonical(key: str) -> str:
    return "/".join(p for p in key.replace("\\", "/").split("/") if p not in ("", "."))


def set_aside(key: str) -> bool:
    """Keys whose rivals the listing may yield elsewhere: not in canonical form, or in _manifest(_)/."""
    c = canonical(key)
    return c != key or c.split("/", 1)[0] in (manifest.MANIFEST_DIR, manifest.MANIFEST_DIR + "_")


def cut(items: Iterable[Item], size: int = SHARD_SIZE) -> Iterator[tuple[list[Item], bool]]:
    """Cut a listing into shards of at least ``size`` inputs (the last one may be smaller), only where no group of
    rivals spans the cut. Yields (items, set_aside)."""
    shard: list[Item] = []
    aside: list[Item] = []
    open_: list[str] = []          # group prefixes that the current key starts with (nested, shortest first)
    for it in items:
        if set_aside(it.key):
            aside.append(it)
            continue
        while open_ and not it.key.startswith(open_[-1]):
            open_.pop()
        if len(shard) >= size and not open_:
            yield shard, False
            shard = []
        p = group_prefix(it.key)
        if not open_ or open_[-1] != p:
            open_.append(p)
        shard.append(it)
    if shard:
        yield shard, False
    if aside:
        yield aside, True


def shard_id(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.source_uri.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:20]


class PlanError(RuntimeError):
    """The plan could not go on: ``where`` is 'source' (listing SRC) or 'destination' (reading its markers)."""

    def __init__(self, where: str, error: BaseException):
        super().__init__(f"{where}: {type(error).__name__}: {error}")
        self.where, self.error = where, error


class Planner:
    """Lists SRC in a background thread and keeps up to ``ready`` shards waiting. :meth:`take` hands them out.
    Errors of the listing (a missing SRC, say) are raised by :meth:`take`."""

    def __init__(self, src: str, dst: str, extensions, limit: int | None, fmt: str, suffix: str, run_id: str,
                 recipe: str, shard_size: int = SHARD_SIZE, ready: int = 3):
        self.src, self.dst, self.extensions, self.limit = src, dst.rstrip("/"), extensions, limit
        self.ext, self.suffix, self.run_id, self.recipe, self.shard_size = \
            codec.EXTENSIONS[fmt], suffix, run_id, recipe, shard_size
        self.queue: queue.Queue = queue.Queue(ready)
        self.listed = 0                   # inputs listed so far
        self.listing_s: float | None = None   # seconds the listing took, once it is done
        self.source_bytes = 0
        self.stopped = threading.Event()
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._run, daemon=True, name="imgxlate-plan")
        self.thread.start()

    # ------------------------------------------------------------------------------------------ consumer side
    def take(self, max_inputs: int, wait: bool = True) -> list[Shard] | None:
        """At least one ready shard (waiting for it when ``wait``), then more while they are ready, up to
        ``max_inputs`` inputs to process; None when the listing is done and every shard was taken."""
        out, todo = [], 0
        while True:
            try:
                got = self.queue.get(block=wait and not out, timeout=None)
            except queue.Empty:
                return out
            if got is None:
                self.queue.put(None)             # stays at the end for the next call
                return out or None
            if isinstance(got, BaseException):
                raise got
            out.append(got)
            todo += got.todo
            if todo >= max_inputs:
                return out

    @property
    def listing_done(self) -> bool:
        return self.listing_s is not None

    def stop(self) -> None:
        self.stopped.set()

    # ------------------------------------------------------------------------------------------ producer side
    def _put(self, what) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(what, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _items(self) -> Iterator[Item]:
        for it in listing.iter_inputs(self.src, self.extensions, exclude=self.dst):
            if self.limit and self.listed >= self.limit:
                return
            self.listed += 1
            self.source_bytes += max(it.size, 0)
            yield it

    def _run(self) -> None:
        try:
            markers = None
            shards = cut(self._items(), self.shard_size)
            while True:
                try:
                    items, aside = next(shards)
                except StopIteration:
                    break
                except Exception as e:
                    raise PlanError("source", e) from e
                try:
                    if markers is None:
                        markers = manifest.shard_markers(self.dst)    # after the first page: SRC exists
                    shard = self._shard(items, aside, markers)
                except Exception as e:
                    raise PlanError("destination", e) from e
                if not self._put(shard):
                    return
            self.listing_s = time.time() - self.t0
            self._put(None)
        except BaseException as e:
            self.listing_s = time.time() - self.t0
            self._put(e)

    def _shard(self, items: list[Item], aside: bool, markers: set[str]) -> Shard:
        sid = shard_id(items)
        keys = listing.output_keys([it.key for it in items], self.ext, self.suffix, [it.source_uri for it in items],
                                   hashed=[canonical(it.key) != it.key for it in items] if aside else None)
        done, attempts, prev_parts, complete_and_done = set(), Counter(), [], False
        if sid in markers:
            marker = manifest.read_shard_marker(self.dst, sid)
            prev_parts = marker.get("parts", [])
            complete_and_done = (marker.get("complete") and marker.get("recipe") == self.recipe
                                 and set(marker.get("counts", {})) <= set(manifest.DONE))
            if not complete_and_done:
                previous = manifest.read_parts(prev_parts, ["source_uri", "status", "recipe"]).to_pylist()
                done = {r["source_uri"] for r in previous if r["status"] in manifest.DONE
                        and r["recipe"] == self.recipe}
                attempts = Counter(r["source_uri"] for r in previous if r["status"] != "skipped_done")
        if complete_and_done:
            return Shard(sid, len(items), [], skipped=len(items), prev_parts=prev_parts, prev_ok=len(items))
        rows, skipped = [], 0
        for it, key in zip(items, keys):
            source = redact(it.source_uri)
            if source in done and not isinstance(key, Exception):
                skipped += 1
                continue
            row = {"source_uri": it.source_uri, "key": it.key, "run_id": self.run_id, "shard": sid,
                   "attempt": attempts[source] + 1, "recipe": self.recipe,
                   "source_bytes": it.size if it.size >= 0 else None}
            if isinstance(key, Exception):
                row.update(source_uri=source, status="write_error", error=str(key))
            else:
                row["output_uri"] = storage.join(self.dst, key)
            rows.append(row)
        blocks = [manifest.to_table(rows[i:i + BLOCK_ROWS]) for i in range(0, len(rows), BLOCK_ROWS)]
        return Shard(sid, len(items), blocks, skipped=skipped, prev_parts=prev_parts, prev_ok=skipped)
