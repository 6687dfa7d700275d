"""A shard's one output object (``--output-format webdataset`` or ``parquet``), made from pieces.

    model actors: each block's outputs -> one piece, a tar fragment   DST/_manifest/_pieces/<run>/<shard>/<h>.tar
    driver (the book), when every input of the shard has its row:
        the pieces it names -> DST/<shard>.tar (or .parquet), written once, then the pieces are removed

A piece is named by the inputs in it, so a block Ray runs twice writes the same piece twice. An output member
that is in more than one piece (a block retried input by input after its actor died) is taken once. Only this
run's pieces are read: a shard's object is made whole by one run (the plan redoes a shard that has no complete
object), and a run removes the pieces earlier runs left (:func:`remove_stale`).

The object is written all or nothing: a local one streamed to a temporary under DST/_manifest/_tmp, synced and
renamed; on an object store, spooled to a local temporary file and sent as one PUT (a multipart upload past
s3fs's part size, which is invisible until it completes). Memory stays one piece at a time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from imgxlate.io import manifest, shards, storage

PIECES_DIR = "_pieces"          # DST/_manifest/_pieces


def pieces_dir(dst: str) -> str:
    return storage.join(dst, storage.JOB_DIR, PIECES_DIR)


def piece_uri(base: str, run_id: str, shard: str, seq: int, sources: list[str]) -> str:
    """A block's piece: named by its first input's place in the shard (pieces sort in input order) and a hash of
    its inputs."""
    h = hashlib.sha256("\n".join(sources).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return storage.join(base, run_id, shard, f"{seq:012d}-{h}.tar")


def _pieces(dst: str, run_id: str, shard: str) -> list[str]:
    folder = storage.join(pieces_dir(dst), run_id, shard)
    fs, path = storage.filesystem(folder)
    try:
        found = storage.retry(fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    proto = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    return sorted(proto + p if proto and not p.startswith(proto) else p for p in found if p.endswith(".tar"))


def _members(dst: str, run_id: str, shard: str, wanted: set[str]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(output member, [its member and its sample's other members]) for each wanted member, once, piece by piece."""
    taken: set[str] = set()
    for uri in _pieces(dst, run_id, shard):
        current, group = None, []
        for name, data in shards.members_of(storage.read_bytes(uri)):
            if name in wanted or current is None or shards.sample_key(name)[0] != shards.sample_key(current)[0]:
                if current is not None and current not in taken:
                    taken.add(current)
                    yield current, group
                current, group = (name, [(name, data)]) if name in wanted else (None, [])
            else:                                # the sample's other members, written after its output
                group.append((name, data))
        if current is not None and current not in taken:
            taken.add(current)
            yield current, group
    if missing := wanted - taken:
        raise OSError(f"{len(missing)} outputs of shard {shard} are in no piece under {pieces_dir(dst)} "
                      f"(e.g. {sorted(missing)[0]!r}): the shard is redone by the next run")


def _write_stream(uri: str, chunks: Iterator[bytes], dst: str) -> int:
    """Write ``chunks`` as the object ``uri``, all or nothing (see the module's notes). Returns its size."""
    n = 0
    if storage.is_local(uri):               # the job's all-or-nothing, durable local write, streamed
        sizes: list[int] = []

        def counted() -> Iterator[bytes]:
            for c in chunks:
                sizes.append(len(c))
                yield c

        writes = storage.LocalWrites(storage.temporaries_dir(dst))
        try:
            writes.write(storage.local_path(uri), counted())
        finally:
            failed = writes.sync()              # (also closes what it opened when the write failed)
        if failed:
            raise next(iter(failed.values()))
        return sum(sizes)
    fs, path = storage.filesystem(uri)
    with tempfile.NamedTemporaryFile(prefix="imgxlate-shard-") as spool:
        for c in chunks:
            spool.write(c)
            n += len(c)
        spool.flush()
        storage.retry(fs.put_file, spool.name, path)
    return n


def assemble(dst: str, run_id: str, shard: str, out_uri: str, rows: pa.Table) -> int:
    """Make a shard's object from this run's pieces: ``rows`` are the shard's manifest rows of this run (every
    input's), whose ``ok`` rows name its members (``output_uri`` = ``out_uri#member``). A tar holds the members
    in input order; a Parquet file holds every row, with the output's bytes in ``output`` (null for a failed row)
    and the sample's other members in ``sidecars`` (name -> bytes). Returns the object's size; removes the
    pieces."""
    prefix = out_uri + "#"
    uris = rows.column("output_uri").to_pylist()
    status = rows.column("status").to_pylist()
    wanted = [u[len(prefix):] for u, s in zip(uris, status) if s == "ok" and u and u.startswith(prefix)]
    if out_uri.endswith(".tar"):
        def tar_chunks() -> Iterator[bytes]:
            for _, group in _members(dst, run_id, shard, set(wanted)):
                yield shards.fragment(group)
            yield shards.END

        n = _write_stream(out_uri, tar_chunks(), dst)
    else:
        n = _write_parquet(dst, run_id, shard, out_uri, rows, prefix, set(wanted))
    remove(dst, run_id, shard)
    return n


PARQUET_SCHEMA = pa.schema(list(manifest.SCHEMA) + [
    pa.field("output", pa.large_binary()),
    pa.field("sidecars", pa.map_(pa.string(), pa.large_binary())),
])


def _write_parquet(dst: str, run_id: str, shard: str, out_uri: str, rows: pa.Table, prefix: str,
                   wanted: set[str]) -> int:
    """One row group per piece (memory: one piece), then the rows without an output."""
    rows = rows.select([f.name for f in manifest.SCHEMA])
    index = {u[len(prefix):]: i for i, u in enumerate(rows.column("output_uri").to_pylist())
             if u and u.startswith(prefix)}

    def groups() -> Iterator[pa.Table]:
        done: set[int] = set()
        batch: list[tuple[int, list]] = []
        for member, group in _members(dst, run_id, shard, wanted):
            batch.append((index[member], group))
            if sum(len(d) for _, g in batch for _, d in g) > 64 << 20:
                yield _table(rows, batch)
                done.update(i for i, _ in batch)
                batch = []
        if batch:
            yield _table(rows, batch)
            done.update(i for i, _ in batch)
        rest = [i for i in range(rows.num_rows) if i not in done]
        if rest:
            yield _table(rows, [(i, []) for i in rest])

    buf_path = None
    with tempfile.NamedTemporaryFile(prefix="imgxlate-shard-", suffix=".parquet", delete=False) as spool:
        buf_path = spool.name
    try:
        with pq.ParquetWriter(buf_path, PARQUET_SCHEMA, compression="zstd") as writer:
            for t in groups():
                writer.write_table(t)

        def chunks() -> Iterator[bytes]:
            with open(buf_path, "rb") as f:
                while c := f.read(8 << 20):
                    yield c

        return _write_stream(out_uri, chunks(), dst)
    finally:
        os.remove(buf_path)


def _table(rows: pa.Table, picked: list[tuple[int, list[tuple[str, bytes]]]]) -> pa.Table:
    t = rows.take(pa.array([i for i, _ in picked], pa.int64()))
    outputs = [g[0][1] if g else None for _, g in picked]
    side = [[(shards.sample_key(name)[1], d) for name, d in g[1:]] if g else None for _, g in picked]
    return t.append_column("output", pa.array(outputs, pa.large_binary())).append_column(
        "sidecars", pa.array(side, PARQUET_SCHEMA.field("sidecars").type))


def remove(dst: str, run_id: str, shard: str | None = None) -> None:
    """Remove a shard's pieces (or all of a run's)."""
    folder = storage.join(pieces_dir(dst), run_id, *([shard] if shard else []))
    fs, path = storage.filesystem(folder)
    try:
        storage.retry(fs.rm, path, recursive=True)
    except FileNotFoundError:
        pass


def remove_stale(dst: str, run_id: str) -> int:
    """Remove the pieces of runs other than ``run_id`` (a killed run's): their shards are redone whole. Returns
    how many runs' pieces were removed."""
    fs, path = storage.filesystem(pieces_dir(dst))
    try:
        runs = [p.rstrip("/").rsplit("/", 1)[-1] for p in storage.retry(fs.ls, path, detail=False)]
    except FileNotFoundError:
        return 0
    stale = [r for r in runs if r != run_id]
    for r in stale:
        remove(dst, r)
    return len(stale)
