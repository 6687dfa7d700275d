"""The driver's book of a run: which shards are open, their counters, and the rows on their way to manifest
parts. The one place that writes manifest parts and shard markers (:mod:`imgxlate.io.manifest` says what they
hold), and that keeps room for them on a local DST (the reserve)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from imgxlate.infer import pieces
from imgxlate.infer.plan import Shard
from imgxlate.io import manifest, storage
from imgxlate.io.listing import redact
from imgxlate.log import log

RESERVE = "_reserve-"           # DST/_manifest/_reserve-<run id>
RESERVE_BYTES = 4 << 20         # room for the last parts, markers and summary of a run whose DST filled up


class ShardBook:
    """The driver's bookkeeping: counters per open shard, and rows on their way to manifest parts. A shard's rows
    are written as a part when a shard completes (or every ``every_rows`` rows, or ``every_s`` seconds), and its
    marker is rewritten after each part, so that a killed run loses at most the rows not yet written.

    When DST refuses a part or a marker because DST itself fails (:func:`storage.dst_failure`: full, over quota,
    ...), ``failure`` says why and the book writes nothing more, keeping the rows, until :meth:`last_try` (the
    driver stops the run, and frees the reserve first)."""

    @dataclass
    class Open:
        shard: Shard
        got: int = 0
        parts: list = dataclasses.field(default_factory=list)
        buffer: list = dataclasses.field(default_factory=list)
        counts: Counter = dataclasses.field(default_factory=Counter)
        complete: bool = False          # every input has its row (its marker says so once written)
        dirty: bool = False             # its marker is behind (rows or a part it does not list yet)
        unmarked: int = 0               # rows in parts its last written marker does not name (a rerun misses them)
        object: dict | None = None      # its one object once written (--output-format webdataset / parquet)

    def __init__(self, dst: str, run_id: str, recipe: str, every_rows: int, every_s: float = 10.0):
        self.dst, self.run_id, self.recipe, self.every_rows, self.every_s = dst, run_id, recipe, every_rows, every_s
        self.open: dict[str, ShardBook.Open] = {}
        self.counts: Counter = Counter()
        self.nbytes: Counter = Counter()
        self.shards = 0
        self.last_flush = time.time()
        self.failure: str | None = None

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
            o.dirty = True
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
        o.complete = o.complete or complete
        if self.failure is not None:            # DST failed: kept for the last try
            return
        try:
            self._write(sid, o)
        except Exception as e:
            if (why := storage.dst_failure(e)) is None:
                raise
            self.failure = why
            log(f"{why}: manifest rows of {self.unrecorded()} outputs are kept until the run stops "
                f"({type(e).__name__}: {e})")
            return
        if o.complete:
            del self.open[sid]

    def _write(self, sid: str, o: Open) -> None:
        if o.shard.out_uri and not o.complete:
            return                              # one object for the shard: its rows wait for it (see _whole)
        if o.buffer:
            rows = pa.concat_tables(o.buffer)
            if o.shard.out_uri:
                rows = self._whole(sid, o, rows)
            part = manifest.write_part(self.dst, self.run_id, f"{sid}-{len(o.parts):03d}", rows)
            o.parts.append(part)
            o.buffer.clear()
            o.unmarked += rows.num_rows
        counts = Counter(o.counts)
        counts["ok"] += o.shard.prev_ok
        manifest.write_shard_marker(self.dst, manifest.ShardMarker(
            shard=sid, n=o.shard.n, complete=o.complete, recipe=self.recipe, run_id=self.run_id,
            counts={k: v for k, v in sorted(counts.items()) if v}, parts=list(o.parts), object=o.object))
        o.dirty, o.unmarked = False, 0

    def _whole(self, sid: str, o: Open, rows: pa.Table) -> pa.Table:
        """The shard's one object (--output-format webdataset / parquet) made from its pieces, before its rows are
        recorded: if that fails for any reason but DST failing (which stops the run), its ok rows become
        write_error rows, and the shard is redone by the next run."""
        if o.object is not None:                # written before DST refused the rows (see last_try)
            return rows
        try:
            size = pieces.assemble(self.dst, self.run_id, sid, o.shard.out_uri, rows)
            o.object = {"name": o.shard.out_uri[len(self.dst) + 1:], "bytes": size}
            return rows
        except Exception as e:
            if storage.dst_failure(e) is not None:
                raise
            error = f"the shard's object {redact(o.shard.out_uri)} could not be written: {type(e).__name__}: {e}"
            log(f"warning: {error}")
        ok = pc.equal(rows.column("status"), "ok")
        n = pc.sum(ok).as_py() or 0
        for counts in (o.counts, self.counts):
            counts["ok"] -= n
            counts["write_error"] += n
        i = rows.schema.get_field_index
        rows = rows.set_column(i("status"), "status", pc.if_else(ok, "write_error", rows.column("status")))
        return rows.set_column(i("error"), "error", pc.if_else(ok, pa.scalar(error), rows.column("error")))

    def flush_all(self) -> None:
        for sid in list(self.open):
            if self.open[sid].dirty:
                self.flush(sid)
        self.last_flush = time.time()

    def drop_unfinished_objects(self) -> int:
        """After a stopped run: the rows of shards whose one object was never written are not recorded, and the
        next run redoes those shards whole. Their rows leave the counts (the summary counts them not_started);
        returns how many."""
        n = 0
        for sid, o in list(self.open.items()):
            if o.shard.out_uri and o.object is None:
                self.counts.subtract(o.counts)
                n += o.got
                del self.open[sid]
        self.counts = Counter({k: v for k, v in self.counts.items() if v > 0})
        return n

    def unrecorded(self) -> int:
        """Rows a rerun would not find: not yet in a manifest part, or in a part no written marker names yet."""
        return sum(t.num_rows for o in self.open.values() for t in o.buffer) + \
            sum(o.unmarked for o in self.open.values())

    def last_try(self) -> int:
        """After DST failed and the run stopped: try each shard's parts and marker once more (a small one may fit
        where a large one did not); returns how many rows are still not recorded (a rerun does their inputs
        again)."""
        why = self.failure
        for sid in [sid for sid, o in self.open.items() if o.dirty]:
            self.failure = None
            self.flush(sid)
        self.failure = self.failure or why
        return self.unrecorded()

    # ---------------------------------------------------------------- the reserve
    def reserve_uri(self) -> str:
        return storage.join(manifest.manifest_root(self.dst), f"{RESERVE}{self.run_id}")

    def reserve(self) -> None:
        """On a local DST, set ``RESERVE_BYTES`` aside (a file of random bytes, which no filesystem compresses
        away) for this run's last manifest parts, markers and summary, once DST is full; reserves that killed
        runs left are removed (the caller holds DST's lease). Raises OSError when DST has no room for it."""
        if not storage.is_local(self.dst):
            return
        root = manifest.manifest_root(self.dst)
        with contextlib.suppress(OSError), os.scandir(root) as entries:
            for e in entries:
                if e.name.startswith(RESERVE) and e.is_file(follow_symlinks=False):
                    os.remove(e.path)
        os.makedirs(root, exist_ok=True)
        try:
            with open(self.reserve_uri(), "wb") as f:
                f.write(os.urandom(RESERVE_BYTES))
                os.fsync(f.fileno())
        except BaseException:
            self.free_reserve()
            raise

    def free_reserve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if storage.is_local(self.dst):
                os.remove(self.reserve_uri())

    def missing(self) -> list[dict]:
        """Inputs of every open shard that never came back from the pipeline (:meth:`dropped`)."""
        return [r for sid in list(self.open) for r in self.dropped(sid)]

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


def lost_rows(meta: dict, rows: list[dict], max_model_retries: int) -> pa.Table:
    """model_error rows for inputs whose block was lost in the pipeline twice (see job.retry_lost)."""
    return failed_rows(meta, rows, "this input's block was lost in the pipeline twice: its model actor died "
                       f"{max_model_retries + 1} times (e.g. out of memory) or its reader died, and it failed "
                       "again when retried on its own")


def failed_rows(meta: dict, rows: list[dict], error: str) -> pa.Table:
    """model_error rows, saying ``error``, for input rows (the plan's input blocks, as dicts) no stage made rows
    for."""
    return manifest.to_table([{**r, "source_uri": redact(r["source_uri"]), "status": "model_error", "error": error,
                               "model_id": meta["model_id"], "model_sha256": meta["sha256"], "task": meta["task"]}
                              for r in rows])
