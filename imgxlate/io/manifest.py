"""The run manifest: one row per input (failures included) as Parquet under DST/_manifest/<run_id>/, one part
per shard of inputs (or more for a large shard), and a summary.json written last.

Each shard also has a marker, DST/_manifest/_shards/<shard>.json, rewritten after each of its parts: which parts
hold its rows (this run's and earlier runs'), its counts, the recipe, and whether every input has a row. A
rerun reads the markers, skips a complete shard whose inputs are all done without reading anything else, and
reads only the parts of the other shards it meets: never all of DST, never every earlier manifest.

A marker records the byte size of each part it names, so that a rerun can check a complete shard's parts with one
listing per earlier run folder instead of reading them. A marker or part that exists but cannot be read (truncated,
say) is :class:`Damaged`: the plan warns, naming the file, and treats it as absent, so its inputs are done again."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import io
import json
import math
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from imgxlate.io import storage
from imgxlate.io.listing import redact
from imgxlate.log import log

MANIFEST_DIR = "_manifest"
SHARD_DIR = "_shards"

STATUSES = ("ok", "skipped_done", "read_error", "decode_error", "too_large", "model_error", "write_error")
DONE = ("ok", "skipped_done")

# Column names avoid `path`: Ray 2.58's read_parquet drops a column of that name.
SCHEMA = pa.schema([
    ("source_uri", pa.string()),         # input, credentials and query strings removed
    ("key", pa.string()),                # input key relative to SRC
    ("output_uri", pa.string()),         # where the output went (or would go)
    ("status", pa.string()),             # one of STATUSES
    ("error", pa.string()),              # why, when status is not ok / skipped_done
    ("warning", pa.string()),            # what an ok output lost or had changed (a profile it could not use, ...)
    ("source_bytes", pa.int64()),
    ("source_width", pa.int32()),
    ("source_height", pa.int32()),
    ("source_mode", pa.string()),        # PIL mode of the file ('RGB', 'P', 'CMYK', 'I;16', 'RGB;16', ...)
    ("output_bytes", pa.int64()),
    ("output_width", pa.int32()),
    ("output_height", pa.int32()),
    ("output_format", pa.string()),      # png / jpeg / webp
    ("output_sha256", pa.string()),
    ("model_id", pa.string()),
    ("model_sha256", pa.string()),
    ("task", pa.string()),               # sr / style / seg
    ("recipe", pa.string()),             # hash of the model and every option that changes output pixels
    ("precision", pa.string()),          # what the model ran at: fp32 / bf16 / fp16 (imgxlate.infer.precision)
    ("t_read_s", pa.float64()),
    ("t_decode_s", pa.float64()),
    ("t_model_s", pa.float64()),
    ("t_encode_s", pa.float64()),
    ("t_write_s", pa.float64()),
    ("node_id", pa.string()),
    ("worker_id", pa.string()),
    ("shard", pa.string()),              # the shard of inputs this row belongs to (its marker: _shards/<shard>.json)
    ("attempt", pa.int32()),             # 1 on the first run that tried this input, 2 on the next, ...
    ("run_id", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
])


class Damaged(ValueError):
    """A manifest file (shard marker or part) that exists but cannot be read: truncated, not JSON / Parquet, or
    missing fields. The message names the file."""


# Byte sizes of the parts this process wrote or found recorded, {(dst, part name): bytes}, so that a marker
# records them (see write_shard_marker) without the writer passing them along; a shard's entries are dropped
# once its complete marker is written, so this holds only open shards' parts.
_SIZES: dict[tuple[str, str], int] = {}


def manifest_root(dst: str) -> str:
    return storage.join(dst, MANIFEST_DIR)


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA)


def write_part(dst: str, run_id: str, name: str, rows: list[dict] | pa.Table) -> str:
    """Write rows (dicts, or a table with SCHEMA's columns) as DST/_manifest/<run_id>/part-<name>.parquet; returns
    its name relative to DST/_manifest."""
    buf = io.BytesIO()
    pq.write_table(rows.select(SCHEMA.names).cast(SCHEMA) if isinstance(rows, pa.Table) else to_table(rows), buf)
    storage.write_bytes(storage.join(manifest_root(dst), run_id, f"part-{name}.parquet"), buf.getvalue())
    remember_part_sizes(dst, {part_name(run_id, name): buf.tell()})
    return part_name(run_id, name)


def remember_part_sizes(dst: str, sizes: dict[str, int]) -> None:
    """Note parts' byte sizes (names relative to DST/_manifest) for the next markers written that name them."""
    for name, size in sizes.items():
        _SIZES[dst.rstrip("/"), name] = size


def shard_marker_uri(dst: str, shard: str) -> str:
    return storage.join(manifest_root(dst), SHARD_DIR, f"{shard}.json")


@dataclass
class ShardMarker:
    """DST/_manifest/_shards/<shard>.json: what is recorded of a shard. Rewritten after each of its parts is
    written, so that a killed run loses at most the rows not yet in a part; ``complete`` once every input of the
    shard has a row. A rerun skips a complete shard made with its ``recipe`` whose ``counts`` are all done."""

    shard: str                   # the shard's id (imgxlate.infer.plan.shard_id)
    n: int                       # inputs in the shard
    complete: bool
    recipe: str
    run_id: str                  # the run that wrote it last
    counts: dict[str, int]       # rows by status, over every run (ok includes earlier runs' ok rows)
    parts: list[str]             # the parts holding its rows, relative to DST/_manifest (DST can move)
    sizes: dict[str, int] = field(default_factory=dict)   # bytes of each part, where known (write_shard_marker
                                                          # fills it; markers written before sizes have none)
    object: dict | None = None   # --output-format webdataset / parquet: the shard's one object, {"name": relative
                                 # to DST, "bytes": its size}, checked before a rerun skips the shard

    def all_done(self, recipe: str | frozenset[str]) -> bool:
        """Complete, made with ``recipe`` (or one of a set of equivalent recipes), and every input done: nothing of
        the shard is left to read."""
        recipes = {recipe} if isinstance(recipe, str) else recipe
        return self.complete and self.recipe in recipes and set(self.counts) <= set(DONE)

    @classmethod
    def from_json(cls, data: bytes) -> ShardMarker:
        """Raises ValueError, KeyError or TypeError when ``data`` is not a marker (read_shard_marker: Damaged)."""
        d = json.loads(data)
        marker = cls(shard=d["shard"], n=int(d["n"]), complete=bool(d.get("complete")),
                     recipe=str(d.get("recipe", "")), run_id=str(d.get("run_id", "")),
                     counts={str(k): int(v) for k, v in d.get("counts", {}).items()},
                     parts=[str(p) for p in d.get("parts", [])],
                     sizes={str(k): int(v) for k, v in (d.get("sizes") or {}).items()},
                     object=d.get("object") if isinstance(d.get("object"), dict) else None)
        if not isinstance(d["shard"], str) or not isinstance(d.get("parts", []), list):
            raise TypeError("'shard' must be a string and 'parts' a list")
        return marker


def write_shard_marker(dst: str, marker: ShardMarker) -> None:
    """Write ``marker``, recording the byte size of each part it names that this process wrote or was told
    (remember_part_sizes) when ``marker.sizes`` does not give it."""
    key = dst.rstrip("/")
    sizes = {p: marker.sizes[p] if p in marker.sizes else _SIZES[key, p] for p in marker.parts
             if p in marker.sizes or (key, p) in _SIZES}
    storage.write_bytes(shard_marker_uri(dst, marker.shard),
                        json.dumps(dataclasses.asdict(dataclasses.replace(marker, sizes=sizes)),
                                   sort_keys=True).encode())
    if marker.complete:                  # no later marker of this shard in this run: forget its parts
        for p in marker.parts:
            _SIZES.pop((key, p), None)


def shard_markers(dst: str) -> set[str]:
    """Ids of the shards that have a marker under DST (one listing of the _shards folder)."""
    fs, root = storage.filesystem(storage.join(manifest_root(dst), SHARD_DIR))
    fs.invalidate_cache()
    try:
        return {posixpath.basename(p)[:-5] for p in fs.ls(root, detail=False) if p.endswith(".json")}
    except FileNotFoundError:
        return set()


def read_shard_marker(dst: str, shard: str) -> ShardMarker:
    """The shard's marker; raises Damaged, naming the file, when it exists but cannot be read (not JSON, no
    permission, an I/O error of the disk), and what else reading raises (FileNotFoundError, a store's error)."""
    uri = shard_marker_uri(dst, shard)
    try:
        data = storage.read_bytes(uri)
    except OSError as e:
        if not _unreadable(e):
            raise
        raise Damaged(f"shard marker {redact(uri)} cannot be read ({type(e).__name__}: {e})") from e
    try:
        return ShardMarker.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Damaged(f"shard marker {redact(uri)} cannot be read ({type(e).__name__}: {e})") from e


def part_sizes(dst: str, run_id: str) -> dict[str, int]:
    """{part name relative to DST/_manifest: bytes} of one run folder's parts, with one listing ({} if none)."""
    fs, root = storage.filesystem(storage.join(manifest_root(dst), run_id))
    fs.invalidate_cache()
    try:
        found = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {f"{run_id}/{posixpath.basename(e['name'].rstrip('/'))}": int(e["size"]) for e in found
            if e.get("type") == "file" and e["name"].endswith(".parquet")}


def part_name(run_id: str, name: str) -> str:
    """A part's name relative to DST/_manifest (what shard markers record, so that DST can move)."""
    return f"{run_id}/part-{name}.parquet"


def read_parts(dst: str, names: list[str], columns: list[str]) -> tuple[pa.Table, list[str]]:
    """``columns`` of the given parts (names relative to DST/_manifest; missing columns of older parts come back
    null), and the names of parts that are gone or cannot be read: a part that exists but is not Parquet (e.g.
    truncated) is warned about by name and treated as gone. An error reading the store is raised."""
    tables, missing = [], []
    for name in names:
        uri = storage.join(manifest_root(dst), *name.split("/"))
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            missing.append(name)
            continue
        except OSError as e:
            if not _unreadable(e):
                raise
            log(f"warning: manifest part {redact(uri)} cannot be read ({type(e).__name__}: {e}): treated as absent")
            missing.append(name)
            continue
        table = _parsed(uri, data, columns)
        if table is None:
            missing.append(name)
        else:
            tables.append(table)
    if not tables:
        return pa.schema([SCHEMA.field(c) for c in columns]).empty_table(), missing
    return pa.concat_tables(tables, promote_options="default"), missing


def _unreadable(e: OSError) -> bool:
    """A manifest file this run may not read (permissions) or whose blocks are bad (EIO on a local disk): the file
    is treated as absent, as a damaged one is, rather than block the run."""
    return isinstance(e, PermissionError) or (e.errno == errno.EIO and e.__context__ is None)


def write_summary(dst: str, run_id: str, summary: dict) -> str:
    uri = storage.join(manifest_root(dst), run_id, "summary.json")
    storage.write_bytes(uri, json.dumps(summary, indent=2, default=str).encode())
    return uri


def _parsed(uri: str, data: bytes, columns: list[str] | None) -> pa.Table | None:
    """``columns`` of the part read from ``uri``; None, with a warning naming it, when its bytes are not a part
    (truncated by a crash or a full disk, say): it is treated as absent."""
    try:
        return _read_part(data, columns)
    except (pa.ArrowException, ValueError, OSError) as e:      # the bytes came; they are not a part
        log(f"warning: manifest part {redact(uri)} cannot be read ({type(e).__name__}: {e}): treated as absent")
        return None


def _uri(dst: str, fs, path: str) -> str:
    """A path that fs.glob returned, as a URI (as the user gave DST: a local path stays a path)."""
    return path if storage.is_local(dst) else fs.unstrip_protocol(path)


def _read_part(data: bytes, columns: list[str] | None) -> pa.Table:
    """``columns`` of a part; a column that an older part lacks (``recipe``, say) comes back null."""
    part = pq.ParquetFile(io.BytesIO(data))
    if columns is None:
        return part.read()
    table = part.read(columns=[c for c in columns if c in part.schema_arrow.names])
    return pa.table({c: table[c] if c in table.column_names else pa.nulls(len(table), SCHEMA.field(c).type)
                     for c in columns})


def read_all(dst: str, columns: list[str] | None = None) -> pa.Table:
    """Every manifest row of every earlier run under DST (empty table when none; a part that cannot be read is
    left out, with a warning naming it)."""
    fs, root = storage.filesystem(manifest_root(dst))
    try:
        parts = sorted(fs.glob(posixpath.join(root, "*", "part-*.parquet")))
    except FileNotFoundError:
        parts = []
    tables = [t for p in parts if (t := _parsed(_uri(dst, fs, p), fs.cat_file(p), columns)) is not None]
    if not tables:
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def read_run(dst: str, run_id: str) -> pa.Table:
    """Every row of one run (a part that cannot be read is left out, with a warning naming it)."""
    fs, root = storage.filesystem(storage.join(manifest_root(dst), run_id))
    parts = sorted(fs.glob(posixpath.join(root, "part-*.parquet")))
    tables = [t for p in parts if (t := _parsed(_uri(dst, fs, p), fs.cat_file(p), None)) is not None]
    return pa.concat_tables(tables, promote_options="default") if tables else SCHEMA.empty_table()


def all_runs(dst: str) -> list[str]:
    """Run ids with any manifest part or a summary (a killed run has parts and no summary), oldest first (in_order)."""
    fs, root = storage.filesystem(manifest_root(dst))
    try:
        found = {p: info for pattern in ("part-*.parquet", "summary.json")
                 for p, info in fs.glob(posixpath.join(root, "*", pattern), detail=True).items()}
    except FileNotFoundError:
        return []
    return in_order(fs, found)


def runs(dst: str) -> list[str]:
    """Run ids with a finished summary, oldest first (in_order)."""
    fs, root = storage.filesystem(manifest_root(dst))
    try:
        found = fs.glob(posixpath.join(root, "*", "summary.json"), detail=True)
    except FileNotFoundError:
        return []
    return in_order(fs, found)


def in_order(fs, found: dict[str, dict]) -> list[str]:
    """The runs of ``found`` (files under _manifest/<run_id>/ with their listing's details), oldest first: by when
    each started, as its summary.json says (started), else by its earliest file's time (a killed run's first
    part); ties by id. Never by id alone: an id may be a name the user chose (--run-id), and two runs started in
    one second have ids that sort by their random part."""
    first: dict[str, float] = {}
    summaries: dict[str, str] = {}
    for path, info in found.items():
        run_id = posixpath.basename(posixpath.dirname(path))
        first[run_id] = min(first.get(run_id, math.inf), _mtime(info))
        if posixpath.basename(path) == "summary.json":
            summaries[run_id] = path
    for run_id in first:                            # a copy's files have the copy's times: an id's own goes first
        if stamp := ID_TIME.match(run_id):
            first[run_id] = dt.datetime.strptime(stamp[1], "%Y%m%dT%H%M%SZ").replace(
                tzinfo=dt.timezone.utc).timestamp()

    def read(path: str) -> dict:
        try:
            return json.loads(storage.retry(fs.cat_file, path))
        except Exception:                           # unreadable: the time above stands
            return {}
    with ThreadPoolExecutor(16, thread_name_prefix="imgxlate-runs") as pool:
        for run_id, summary in zip(summaries, pool.map(read, summaries.values())):
            first[run_id] = started(summary, first[run_id])
    return sorted(first, key=lambda r: (first[r], r))


ID_TIME = re.compile(r"(\d{8}T\d{6}Z)-")          # a run id the job made: the UTC second it started (verify's too)


def started(summary: dict, default: float) -> float:
    """When the run of ``summary`` (its summary.json) started, in seconds since the epoch: its started_at; for a
    summary written before runs recorded that, finished_at less wall_s; else ``default``."""
    try:
        if summary.get("started_at"):
            return dt.datetime.fromisoformat(summary["started_at"]).timestamp()
        if summary.get("finished_at"):
            return dt.datetime.fromisoformat(summary["finished_at"]).timestamp() - float(summary.get("wall_s") or 0)
    except (TypeError, ValueError):
        pass
    return default


def _mtime(info: dict) -> float:
    """A listed file's modification time in seconds since the epoch (a local disk says mtime, S3 LastModified)."""
    t = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(t, dt.datetime):
        return t.timestamp()
    try:
        return float(t)
    except (TypeError, ValueError):
        return math.inf
