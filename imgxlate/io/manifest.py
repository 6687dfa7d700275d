"""The run manifest: one row per input (failures included) as Parquet under DST/_manifest/<run_id>/, one part
per shard of inputs (or more for a large shard), and a summary.json written last.

Each shard also has a marker, DST/_manifest/_shards/<shard>.json, rewritten after each of its parts: which parts
hold its rows (this run's and earlier runs'), its counts, the recipe, and whether every input has a row. A
rerun reads the markers, skips a complete shard whose inputs are all done without reading anything else, and
reads only the parts of the other shards it meets: never all of DST, never every earlier manifest."""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from imgxlate.io import storage

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
    return part_name(run_id, name)


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

    def all_done(self, recipe: str) -> bool:
        """Complete, made with ``recipe``, and every input done: nothing of the shard is left to read."""
        return self.complete and self.recipe == recipe and set(self.counts) <= set(DONE)

    @classmethod
    def from_json(cls, data: bytes) -> ShardMarker:
        d = json.loads(data)
        return cls(shard=d["shard"], n=d["n"], complete=bool(d.get("complete")), recipe=d.get("recipe", ""),
                   run_id=d.get("run_id", ""), counts=dict(d.get("counts", {})), parts=list(d.get("parts", [])))


def write_shard_marker(dst: str, marker: ShardMarker) -> None:
    storage.write_bytes(shard_marker_uri(dst, marker.shard),
                        json.dumps(dataclasses.asdict(marker), sort_keys=True).encode())


def shard_markers(dst: str) -> set[str]:
    """Ids of the shards that have a marker under DST (one listing of the _shards folder)."""
    fs, root = storage.filesystem(storage.join(manifest_root(dst), SHARD_DIR))
    fs.invalidate_cache()
    try:
        return {posixpath.basename(p)[:-5] for p in fs.ls(root, detail=False) if p.endswith(".json")}
    except FileNotFoundError:
        return set()


def read_shard_marker(dst: str, shard: str) -> ShardMarker:
    return ShardMarker.from_json(storage.read_bytes(shard_marker_uri(dst, shard)))


def part_name(run_id: str, name: str) -> str:
    """A part's name relative to DST/_manifest (what shard markers record, so that DST can move)."""
    return f"{run_id}/part-{name}.parquet"


def read_parts(dst: str, names: list[str], columns: list[str]) -> tuple[pa.Table, list[str]]:
    """``columns`` of the given parts (names relative to DST/_manifest; missing columns of older parts come back
    null), and the names of parts that are gone."""
    tables, missing = [], []
    for name in names:
        try:
            tables.append(_read_part(storage.read_bytes(storage.join(manifest_root(dst), *name.split("/"))),
                                     columns))
        except FileNotFoundError:
            missing.append(name)
    if not tables:
        return pa.schema([SCHEMA.field(c) for c in columns]).empty_table(), missing
    return pa.concat_tables(tables, promote_options="default"), missing


def write_summary(dst: str, run_id: str, summary: dict) -> str:
    uri = storage.join(manifest_root(dst), run_id, "summary.json")
    storage.write_bytes(uri, json.dumps(summary, indent=2, default=str).encode())
    return uri


def _read_part(data: bytes, columns: list[str] | None) -> pa.Table:
    """``columns`` of a part; a column that an older part lacks (``recipe``, say) comes back null."""
    part = pq.ParquetFile(io.BytesIO(data))
    if columns is None:
        return part.read()
    table = part.read(columns=[c for c in columns if c in part.schema_arrow.names])
    return pa.table({c: table[c] if c in table.column_names else pa.nulls(len(table), SCHEMA.field(c).type)
                     for c in columns})


def read_all(dst: str, columns: list[str] | None = None) -> pa.Table:
    """Every manifest row of every earlier run under DST (empty table when none)."""
    fs, root = storage.filesystem(manifest_root(dst))
    try:
        parts = sorted(fs.glob(posixpath.join(root, "*", "part-*.parquet")))
    except FileNotFoundError:
        parts = []
    tables = [_read_part(fs.cat_file(p), columns) for p in parts]
    if not tables:
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def read_run(dst: str, run_id: str) -> pa.Table:
    fs, root = storage.filesystem(storage.join(manifest_root(dst), run_id))
    parts = sorted(fs.glob(posixpath.join(root, "part-*.parquet")))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(p))) for p in parts]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def all_runs(dst: str) -> list[str]:
    """Run ids with any manifest part or a summary (a killed run has parts and no summary), oldest first."""
    fs, root = storage.filesystem(manifest_root(dst))
    try:
        found = [p for pattern in ("part-*.parquet", "summary.json")
                 for p in fs.glob(posixpath.join(root, "*", pattern))]
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(posixpath.dirname(p)) for p in found})


def runs(dst: str) -> list[str]:
    """Run ids with a finished summary, oldest first."""
    fs, root = storage.filesystem(manifest_root(dst))
    try:
        found = fs.glob(posixpath.join(root, "*", "summary.json"))
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(posixpath.dirname(p)) for p in found)
