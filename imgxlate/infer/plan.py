"""The batch job's plan, as a stream: list SRC page by page, cut the inputs into shards, and decide per shard
what is left to do from its marker (see :mod:`imgxlate.io.manifest`).

    listing (paged; S3 in parallel key ranges) -> shards of ~10,000 inputs -> per shard: output keys, resume
    -> a bounded queue of ready shards, which the job takes while the listing goes on

A shard is the unit of key assignment, of manifest parts and of resume. Output keys are unique within a shard
by construction (:func:`imgxlate.io.keys.output_keys`); across shards they are unique because a cut is only
made where no two inputs on either side could ever get the same key: rival inputs share their folder and their
name up to its first '.', i.e. a key prefix, and the listing yields every key with a given prefix in one run.
Keys that the listing may not yield next to their rivals (a key with '//' or './' in it, or under _manifest/)
are set aside into a last shard, and the non-canonical ones among them get hashed names.

Only the current shard's inputs and the ready shard(s) are in memory, whatever the number of inputs: the
listing waits while they are not taken. Their input blocks are kept sealed and compressed.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from imgxlate.infer.blocks import seal, unseal
from imgxlate.infer.stages import INPUT
from imgxlate.io import codec, keys, listing, manifest, shards, storage
from imgxlate.io.listing import Item, redact
from imgxlate.log import log

SHARD_SIZE = 10_000
# A Ray Data block of inputs is what one read/decode task takes: sized by the inputs' bytes, so that tiny images
# go hundreds to a task (per-task costs spread thin) and large ones one to a task (memory, parallelism).
BLOCK_BYTES = 1 << 20
BLOCK_ROWS = 256         # at most
UNKNOWN_SIZE = 32 << 10  # assumed for an input the listing gives no size for (a manifest entry)
DONE_READY = 64          # shards done in an earlier run, kept waiting apart from the ready ones: they hold no
                         # inputs, and a resume walks past them while the Feeder is full
MIN_BLOCKS = 64          # a shard is cut into at least this many blocks (as its inputs allow): model actors on
                         # many nodes each need blocks to take, however few and small the inputs are


@dataclass
class Shard:
    id: str
    n: int                      # inputs in the shard
    blocks: list[tuple[pa.Table, int]]   # the inputs to send through the pipeline, sized by bytes (rows with a
                                # status set, e.g. a refused key, pass through untouched), as (sealed block, rows):
                                # compressed, as the driver holds them until they are back (see blocks.seal)
    skipped: int = 0            # inputs already done by an earlier run: no row, counted as skipped_done
    prev_parts: list[str] = field(default_factory=list)   # earlier runs' parts holding this shard's rows
    prev_ok: int = 0
    todo: int = 0               # rows in blocks
    out_uri: str | None = None  # --output-format webdataset / parquet: the shard's one output object

    def __post_init__(self):
        self.todo = sum(rows for _, rows in self.blocks)

    def tables(self) -> Iterator[pa.Table]:
        """The input blocks as tables (manifest schema)."""
        for sealed, _ in self.blocks:
            yield unseal(sealed)


def _boundary(group: str, size: int) -> bool:
    """Content-defined cut points: a shard ends before a group whose hash says so, so that adding or removing an
    input changes only its own shard (and markers of the others still match)."""
    h = int.from_bytes(hashlib.blake2b(group.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return h % max(1, size - size // 4) == 0


def cut(items: Iterable[Item], size: int = SHARD_SIZE, exts: tuple[str, ...] = listing.IMAGE_EXTS
        ) -> Iterator[tuple[list[Item], str]]:
    """Cut a listing into shards, only where no group of rivals spans the cut. Yields (items, kind): kind is
    'plain'; 'hashed' for the keys of :func:`~imgxlate.io.keys.set_aside` (their outputs get hashed names; chunks
    of ``size``); or 'manifest' for keys under _manifest(_)/ (one shard, at the end).

    A cut is made before a key whose group hashes to a cut point (about every ``size`` inputs, never before
    ``size // 4``), or at 2 x ``size``. Inputs of groups still open at a cut (the current key's prefix is theirs,
    so a rival may follow) are held back into the next shard."""
    exts = tuple(e.lower() for e in exts)
    shard: list[tuple[Item, str]] = []
    odd: list[Item] = []
    manifest_keys: list[Item] = []
    open_: list[str] = []          # prefixes ('folder/stem.') of groups a later key may still belong to
    for it in items:
        if keys.set_aside(it.key):
            odd.append(it)
            if len(odd) >= size:
                yield odd, "hashed"
                odd = []
            continue
        if keys.in_manifest_folder(it.key):
            manifest_keys.append(it)
            continue
        g = keys.group_of(it.key, exts)
        while open_ and not it.key.startswith(open_[-1]):
            open_.pop()
        if shard and g != shard[-1][1] and ((len(shard) >= size // 4 and _boundary(g, size)) or
                                            len(shard) >= 2 * size):
            held = set(open_)
            keep = [(x, gx) for x, gx in shard if gx + "." in held]
            out = [x for x, gx in shard if gx + "." not in held]
            if out:
                yield out, "plain"
                shard = keep
        if not open_ or open_[-1] != g + ".":
            open_.append(g + ".")
        shard.append((it, g))
    if shard:
        yield [x for x, _ in shard], "plain"
    if odd:
        yield odd, "hashed"
    if manifest_keys:
        yield manifest_keys, "manifest"


def shard_id(items: list[Item], out_keys: list) -> str:
    """Names a shard by its inputs and their output keys: a rerun finds the same shard only when both match."""
    h = hashlib.sha256()
    for it, key in zip(items, out_keys):
        h.update(f"{redact(it.source_uri)}\0{key}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:20]


class PlanError(RuntimeError):
    """The plan could not go on: ``where`` is 'source' (listing SRC), 'destination' (reading its markers) or
    'plan' (anything else)."""

    def __init__(self, where: str, error: BaseException):
        super().__init__(f"{where}: {type(error).__name__}: {error}")
        self.where, self.error = where, error


class Planner:
    """Lists SRC in a background thread and keeps up to ``ready`` shards waiting (it reads no further until one
    is taken, so that the driver holds only those and the current shard's inputs), and up to DONE_READY shards
    done before (a resume). :meth:`take` hands them out.
    Errors of the listing (a missing SRC, say) are raised by :meth:`take`."""

    equivalent: tuple[str, ...] = ()
    input_format: str = "files"                         # or webdataset / parquet: one shard per tar / file
    output_format: str = "files"                        # or webdataset / parquet: one object per shard
    _listed: dict[str, dict[str, int]] | None = None   # earlier runs' part sizes, {run id: {part: bytes}}, listed
                                                        # once per run folder (see _changed_parts)

    @property
    def recipes(self) -> frozenset[str]:
        """Earlier rows made with any of these recipes are done."""
        return frozenset((self.recipe, *self.equivalent))

    def __init__(self, src: str, dst: str, extensions, limit: int | None, fmt: str, suffix: str, run_id: str,
                 recipe: str, shard_size: int = SHARD_SIZE, ready: int = 3, equivalent: tuple[str, ...] = (),
                 input_format: str = "files", output_format: str = "files", image_column: str | None = None,
                 key_column: str | None = None):
        self.src, self.dst, self.extensions, self.limit = src, dst.rstrip("/"), extensions, limit
        self.input_format, self.output_format = input_format, output_format
        self.image_column, self.key_column = image_column, key_column
        self.exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.ext, self.suffix, self.run_id, self.recipe, self.shard_size = \
            codec.EXTENSIONS[fmt], suffix, run_id, recipe, shard_size
        self.equivalent = tuple(equivalent)     # recipes of the same outputs (config.equivalent_recipes)
        self.queue: queue.Queue = queue.Queue()
        self.objects: dict[str, str] = {}        # shard objects named this run (--output-format webdataset / parquet)
        self.room = threading.Semaphore(ready)    # shards built and not yet taken (a listing waits for room
                                                  # before it reads the next shard's inputs)
        self.done_room = threading.Semaphore(DONE_READY)  # shards with nothing to do wait apart (see DONE_READY)
        self.listed = 0                   # inputs listed so far
        self.listing_s: float | None = None   # seconds the listing took, once it is done
        self.source_bytes = 0
        self.unknown_sizes = 0            # inputs listed without a size (a manifest SRC of URIs)
        self.stopped = threading.Event()
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._run, daemon=True, name="imgxlate-plan")
        self.thread.start()

    # ------------------------------------------------------------------------------------------ consumer side
    def take(self, max_inputs: int, timeout: float | None = None) -> list[Shard] | None:
        """At least one ready shard (waiting up to ``timeout`` seconds for it: [] when none came), then more while
        they are ready, up to ``max_inputs`` inputs to process; None once the listing is done and every shard was
        taken. Raises the listing's error (PlanError)."""
        out, todo = [], 0
        while True:
            try:
                got = self.queue.get(block=not out, timeout=timeout)
            except queue.Empty:
                return out
            if got is None:
                self.queue.put(None)             # stays at the end for the next call
                return out or None
            if isinstance(got, BaseException):
                self.queue.put(got)              # and so does an error
                raise got
            (self.room if got.todo else self.done_room).release()
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
    def _wait_for_room(self, room: threading.Semaphore | None = None) -> bool:
        while not self.stopped.is_set():
            if (room or self.room).acquire(timeout=0.5):
                return True
        return False

    def _items(self) -> Iterator[Item]:
        for it in listing.iter_inputs(self.src, self.extensions, exclude=self.dst):
            if self.limit and self.listed >= self.limit:
                return
            self.listed += 1
            self.source_bytes += max(it.size, 0)
            self.unknown_sizes += it.size < 0
            yield it

    def _unit_shards(self) -> Iterator[tuple[list[Item], str, str]]:
        """WebDataset tars or Parquet files: one shard per file, whatever its size (resumed or redone as a unit),
        its inputs listed from the tar's headers or the Parquet key column when the shard is built."""
        tar = self.input_format == "webdataset"
        for unit in (shards.tars if tar else shards.parquet_files)(self.src, exclude=self.dst):
            if self.limit and self.listed >= self.limit:
                return
            try:
                members = shards.items(unit, self.exts) if tar else \
                    shards.parquet_items(unit, self.image_column, self.key_column)
            except listing.SourceError as e:     # the columns: the first file's stop the run before any work (a
                if not self.listed:              # wrong --image-column), a later file's are its one row
                    raise
                members = [listing.Item(unit.source_uri + "#", unit.key + "/", unit.size, error=str(e))]
            if self.limit and not self.whole:    # a shard's object holds all of its inputs: never cut it
                members = members[:self.limit - self.listed]
            self.listed += len(members)
            self.source_bytes += sum(max(it.size, 0) for it in members if not it.error)
            self.unknown_sizes += sum(it.size < 0 for it in members if not it.error)
            if members:
                yield members, "unit", unit.key

    def _run(self) -> None:
        try:
            markers = None
            shards = self._unit_shards() if self.input_format != "files" else \
                ((items, kind, None) for items, kind in cut(self._items(), self.shard_size, self.exts))
            while True:
                if not self._wait_for_room():
                    return
                try:
                    items, kind, tar_key = next(shards)
                except StopIteration:
                    break
                except Exception as e:
                    raise PlanError("source", e) from e
                if markers is None:
                    try:
                        markers = manifest.shard_markers(self.dst)    # after the first page: SRC exists
                    except Exception as e:
                        raise PlanError("destination", e) from e
                shard = self._shard(items, kind, markers, tar_key)
                if not shard.todo:              # done before: it holds no inputs, and waits apart
                    self.room.release()
                    if not self._wait_for_room(self.done_room):
                        return
                self.queue.put(shard)
            self.listing_s = time.time() - self.t0
            self.queue.put(None)
        except BaseException as e:
            self.listing_s = time.time() - self.t0
            self.queue.put(e if isinstance(e, PlanError) else PlanError("plan", e))

    def _previous(self, sid: str, known_bad: tuple[int, int] = (0, 0)) -> tuple[dict, list[str]]:
        """A shard's earlier rows, {source: (status, recipe, attempts)} with the latest row of each source (None
        when the marker says the shard is complete and all done with this recipe, and its parts are there with the
        sizes it records), and its parts (names relative to DST/_manifest). A part that is gone or cannot be read
        is left out, and a marker that cannot be read counts as none, each with a warning naming it: their inputs
        are done again."""
        try:
            try:
                marker = manifest.read_shard_marker(self.dst, sid)
            except manifest.Damaged as e:
                log(f"warning: {e}: treated as absent, so the shard's inputs are done again (its next "
                    f"marker replaces it)")
                return {}, []
            parts = marker.parts
            done = marker.all_done(self.recipes) or self.whole and self._final(marker, known_bad)
            changed = self._changed_parts(marker) if done else []
            if done and not changed and self._object_there(marker):
                return None, parts               # complete, every input done with this recipe: nothing to read
            if changed:
                log(f"warning: shard {sid}: {len(changed)} manifest part(s) its marker names are gone or not the "
                    f"size it records ({changed[0]}, ...): its parts are read one by one")
            table, missing = manifest.read_parts(self.dst, parts, ["source_uri", "status", "recipe"])
        except Exception as e:
            raise PlanError("destination", e) from e
        if missing:
            log(f"warning: shard {sid}: {len(missing)} manifest part(s) its marker names are gone or unreadable "
                f"({missing[0]}, ...): the inputs they held are done again")
        state: dict = {}
        for src, status, rcp in zip(*(table.column(c).to_pylist() for c in ("source_uri", "status", "recipe"))):
            seen = state.get(src, (None, None, 0))[2]
            state[src] = (status, rcp, seen + (status != "skipped_done"))
        kept = [p for p in parts if p not in missing]
        manifest.remember_part_sizes(self.dst, {p: marker.sizes[p] for p in kept
                                                if p in marker.sizes and p not in changed})
        return state, kept

    FINAL = ("decode_error", "too_large")   # failures a rerun would repeat: they do not make a shard's one
                                            # object be written again

    def _final(self, marker: manifest.ShardMarker, known_bad: tuple[int, int]) -> bool:
        """A complete one-object shard made with this recipe whose only failures a rerun would repeat: undecodable or
        too large, and ``known_bad`` (read_error rows the listing gives: a duplicate tar member, a tar cut short;
        write_error rows of names no output can have). Any other failure has it redone whole."""
        if not (marker.complete and marker.recipe in self.recipes):
            return False
        other = {k: v for k, v in marker.counts.items() if k not in manifest.DONE and k not in self.FINAL}
        bad = other.get("read_error", 0), other.get("write_error", 0)
        return set(other) <= {"read_error", "write_error"} and bad[0] <= known_bad[0] and bad[1] <= known_bad[1]

    def _object_there(self, marker: manifest.ShardMarker) -> bool:
        """Whether a shard's one object is there with the size its marker records (one HEAD): another run with
        other options may have written another object under the same name. True when the marker records none."""
        if not marker.object:
            return True
        uri = storage.join(self.dst, marker.object["name"])
        try:
            fs, path = storage.filesystem(uri)
            size = storage.retry(fs.info, path).get("size")
        except FileNotFoundError:
            size = None
        recorded = marker.object.get("bytes")
        if size != recorded:
            found = "gone" if size is None else f"{size} bytes, not the {recorded} its marker records"
            log(f"warning: shard {marker.shard}: its object {redact(uri)} is {found}: the shard is done again")
            return False
        return True

    def _changed_parts(self, marker: manifest.ShardMarker) -> list[str]:
        """The parts of ``marker`` that are gone or whose size is not the one it records (parts it records no size
        for are trusted), from one listing per earlier run folder, kept for the rest of the plan."""
        if self._listed is None:
            self._listed = {}
        changed = []
        for name in marker.parts:
            if name not in marker.sizes:
                continue
            run = name.split("/", 1)[0]
            if run not in self._listed:
                self._listed[run] = manifest.part_sizes(self.dst, run)
            if self._listed[run].get(name) != marker.sizes[name]:
                changed.append(name)
        return changed

    @property
    def whole(self) -> bool:
        """Whether a shard's outputs are one object (--output-format webdataset / parquet): then a shard is done
        whole or redone whole, as its object is written once from all of its outputs."""
        return self.output_format != "files"

    def _shard(self, items: list[Item], kind: str, markers: set[str], tar_key: str | None = None) -> Shard:
        named = [it for it in items if not it.error]       # an input known bad (a duplicate tar member) gets no
        outs = iter(keys.output_keys([it.key for it in named], self.ext, self.suffix,   # output name: it makes
                                     [it.source_uri for it in named],                   # no other one rename
                                     min_level=[3] * len(named) if kind == "hashed" else None))
        outs = [None if it.error else next(outs) for it in items]
        sid = shard_id(items, outs)
        name = keys.object_name(sid, tar_key, self.output_format) if self.whole else None
        if name is not None and self.objects.setdefault(name, sid) != sid:     # its object would overwrite theirs
            name, outs = None, [None if it.error else OSError(f"its shard's output object {name} is also another "
                                                              f"shard's in this run: rename one") for it in items]
        known_bad = sum(bool(it.error) or not keys.is_utf8(it.source_uri) for it in items), sum(
            isinstance(o, Exception) for o in outs)
        state, prev_parts = ({}, []) if sid not in markers else self._previous(sid, known_bad)
        if state is None:                        # complete, and every input done with this recipe
            return Shard(sid, len(items), [], skipped=len(items), prev_parts=prev_parts, prev_ok=len(items))
        out_uri, safe_tar = None, keys.member_prefix(tar_key) if tar_key else None
        if name is not None:                     # one object for the shard: redone whole, so nothing is skipped
            out_uri = storage.join(self.dst, name)
            state = {src: (None, None, attempts) for src, (_, _, attempts) in state.items()}
        blocks, block, nbytes, skipped = [], [], 0, 0     # rows are built a block at a time (memory)
        max_rows = max(1, min(BLOCK_ROWS, -(-len(items) // MIN_BLOCKS)))
        recipes = self.recipes
        for n, (it, key) in enumerate(zip(items, outs), 1):
            source = redact(it.source_uri)
            status, rcp, attempts = state.get(source, (None, None, 0))
            if status in manifest.DONE and rcp in recipes and not isinstance(key, Exception):
                skipped += 1
            else:
                row = {"source_uri": it.source_uri, "key": it.key, "attempt": attempts + 1,
                       "source_bytes": it.size if it.size >= 0 else None}
                if it.group >= 0:
                    row.update(pq_row_group=it.group, pq_row=it.offset, tar_member=it.key[len(tar_key) + 1:])
                elif it.offset >= 0:
                    row.update(tar_offset=it.offset, tar_sidecars=it.sidecars,
                               tar_member=it.key[len(tar_key) + 1:])
                if not keys.is_utf8(it.source_uri):     # (a tar member's name too: nothing of it is read)
                    for k in ("tar_member", "tar_offset", "tar_sidecars", "pq_row_group", "pq_row"):
                        row.pop(k, None)
                    row.update(source_uri=keys.escaped(source), key=keys.escaped(it.key), status="read_error",
                               error="the file name is not valid UTF-8 (shown with \\x escapes): rename it")
                elif it.error:
                    row.update(source_uri=source, status="read_error", error=it.error)
                elif isinstance(key, Exception):
                    row.update(source_uri=source, status="write_error", error=str(key))
                elif out_uri:
                    member = key[len(safe_tar) + 1:] if safe_tar else key
                    row.update(output_uri=f"{out_uri}#{member}", out_member=member, seq=n - 1)
                else:
                    row["output_uri"] = storage.join(self.dst, key)
                block.append(row)
                nbytes += row["source_bytes"] or UNKNOWN_SIZE
            if it.group >= 0:   # a Parquet row group is read whole: one block, unless it is large
                nxt = items[n].group if n < len(items) else -1
                cut_here = block and (nxt != it.group or nbytes >= shards.PARQUET_BLOCK_BYTES or
                                      len(block) >= BLOCK_ROWS)
            else:
                cut_here = block and (nbytes >= BLOCK_BYTES or len(block) >= max_rows or n == len(items))
            if cut_here:
                blocks.append((seal(input_table(block, sid, self.run_id, self.recipe), "zstd"), len(block)))
                block, nbytes = [], 0
        return Shard(sid, len(items), blocks, skipped=skipped, prev_parts=prev_parts, prev_ok=skipped,
                     out_uri=out_uri)


_BLOCK_FIELDS = ("source_uri", "key", "output_uri", "status", "error", "source_bytes", "attempt", "tar_offset",
                 "tar_sidecars", "tar_member", "out_member", "seq", "pq_row_group", "pq_row")


def input_table(rows: list[dict], shard: str | None = None, run_id: str | None = None,
                recipe: str | None = None) -> pa.Table:
    """Input rows as a table of :data:`~imgxlate.infer.stages.INPUT` (the manifest's columns and where a tar
    member lies), built by column; the columns the pipeline fills start null. ``shard``, ``run_id`` and ``recipe``
    are set on every row when given (else taken from the rows)."""
    n = len(rows)
    given = {f: pa.array([r.get(f) for r in rows], type=INPUT.field(f).type)
             for f in (*_BLOCK_FIELDS, "shard", "run_id", "recipe")}
    for name, value in (("shard", shard), ("run_id", run_id), ("recipe", recipe)):
        if value is not None:
            given[name] = pa.array([value] * n, pa.string())
    return pa.Table.from_arrays([given[f.name] if f.name in given else pa.nulls(n, f.type) for f in INPUT],
                                schema=INPUT)
