"""The batch job's stages, per block and with no Ray in them (:mod:`imgxlate.infer.raydata` wires them into
one Ray Data dataset for the whole run):

    Feed (an actor the driver puts the plan's input blocks in, as shards become ready)
      -> read:    PlanSource's reader tasks pull blocks from the Feed until it is closed
      -> load:    read bytes + decode                  CPU tasks          } split: GPU actors
      -> predict: Predictor, loaded once per actor      actor pool         }
      -> save:    encode + write to the output key      CPU tasks          }
         or all three in the model actor's one call (fused: the default on CPU, where the actor's CPU
         does the model's work anyway and a tiny image costs less than a task hop)
      -> one manifest row per input

Each stage takes and returns a pyarrow Table with FLIGHT's columns, so failures travel as rows:
a row whose status is set is passed through untouched by later stages. Pixels travel as raw bytes
with their shape and dtype beside them.

Between stages a block travels sealed: one row holding the table as Arrow IPC bytes
(:func:`imgxlate.infer.blocks.seal`). Ray Data then neither merges the plan's blocks (sized by the images'
bytes) nor splits them, and passes each one on as soon as it is made: see :func:`imgxlate.infer.raydata.build`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgxlate.infer import counters, pieces
from imgxlate.infer.config import check_same_model, pixel_contract
from imgxlate.io import codec, manifest, shards, storage
from imgxlate.io.listing import redact, redact_text

# An input block: the manifest's columns, and for a WebDataset member where it lies and what goes with it
# (imgxlate.io.shards): its data's offset in its tar, its name there, its sample's other members ([[name, offset,
# size]] JSON), and its name in the shard's one output object (--output-format webdataset / parquet).
INPUT = pa.schema(list(manifest.SCHEMA) + [
    pa.field("tar_offset", pa.int64()),
    pa.field("tar_member", pa.string()),
    pa.field("tar_sidecars", pa.string()),
    pa.field("out_member", pa.string()),
    pa.field("seq", pa.int64()),                    # its place in the shard (the object keeps input order)
    pa.field("pq_row_group", pa.int32()),           # a Parquet row's row group and its row in it
    pa.field("pq_row", pa.int64()),
])
FLIGHT = pa.schema(list(INPUT) + [
    pa.field("sidecar_tar", pa.large_binary()),     # the sample's other members, as a tar fragment named by extension
    pa.field("pixels", pa.large_binary()),
    pa.field("alpha", pa.large_binary()),
    pa.field("px_shape", pa.list_(pa.int32())),
    pa.field("px_dtype", pa.string()),
    pa.field("icc", pa.large_binary()),
])


NOT_STARTED = "not_started"       # drained on a signal: no manifest row, left for the next run


def _now():
    return dt.datetime.now(dt.timezone.utc)


class Rows:
    """A batch seen row by row without turning it into dicts (``to_pylist``) and back (``from_pylist``): a column
    becomes a Python list only when a stage reads or sets it, pixels are read as zero-copy Arrow buffers, and
    :meth:`table` reuses every column no stage touched."""

    BINARY = ("pixels", "alpha", "sidecar_tar")

    def __init__(self, batch: pa.Table):
        self.batch, self.n = batch, batch.num_rows
        self.cols: dict[str, list] = {}
        self.changed: set[str] = set()

    def column(self, name: str) -> list:
        c = self.cols.get(name)
        if c is None:
            if name not in self.batch.column_names:
                c = [None] * self.n
            elif name in self.BINARY:
                c = [v.as_buffer() if v.is_valid else None for v in self.batch.column(name)]
            else:
                c = self.batch.column(name).to_pylist()
            self.cols[name] = c
        return c

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Row:
        return Row(self, i)

    def __iter__(self):
        return (Row(self, i) for i in range(self.n))

    def table(self, schema: pa.Schema = FLIGHT) -> pa.Table:
        arrays = []
        for f in schema:
            if f.name in self.changed:
                col = self.cols[f.name]
                if f.name in self.BINARY:       # rows left as they came are still Arrow buffers
                    col = [v.to_pybytes() if isinstance(v, pa.Buffer) else v for v in col]
                arrays.append(pa.array(col, type=f.type))
            elif f.name in self.batch.column_names:
                arrays.append(self.batch.column(f.name).cast(f.type))
            else:
                arrays.append(pa.nulls(self.n, f.type))
        return pa.Table.from_arrays(arrays, schema=schema)


class Row:
    """One row of :class:`Rows`, read and set like a dict."""

    __slots__ = ("rows", "i")

    def __init__(self, rows: Rows, i: int):
        self.rows, self.i = rows, i

    def __getitem__(self, name: str):
        return self.rows.column(name)[self.i]

    def get(self, name: str, default=None):
        v = self.rows.column(name)[self.i]
        return default if v is None else v

    def __setitem__(self, name: str, value) -> None:
        self.rows.column(name)[self.i] = value
        self.rows.changed.add(name)


def _pack(row: Row, pixels: np.ndarray, alpha: np.ndarray | None) -> None:
    row["pixels"] = np.ascontiguousarray(pixels).tobytes()
    row["alpha"] = None if alpha is None else np.ascontiguousarray(alpha).tobytes()
    row["px_shape"] = list(pixels.shape)
    row["px_dtype"] = pixels.dtype.str


def _unpack(row: Row) -> tuple[np.ndarray, np.ndarray | None]:
    shape, dtype = tuple(row["px_shape"]), np.dtype(row["px_dtype"])
    pixels = np.frombuffer(row["pixels"], dtype).reshape(shape)
    alpha = None if row["alpha"] is None else np.frombuffer(row["alpha"], dtype).reshape(shape[:2])
    return pixels, alpha


def fail_row(row: Row, status: str, error: BaseException | str) -> None:
    """Mark ``row`` failed with ``status`` and a redacted one-line ``error``; its pixels are dropped."""
    row["status"] = status
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    row["error"] = redact_text(msg)
    row["pixels"] = row["alpha"] = row["icc"] = None


def _apply(env: dict) -> None:
    """Storage settings from the driver (the S3 endpoint), for workers started before they were set."""
    os.environ.update({k: v for k, v in env.items() if v})


def _stopping(stop) -> bool:
    """Whether the run is draining. ``stop``: None, or an object whose ``is_set()`` says so (the run's stop flag,
    :class:`imgxlate.infer.raydata.StopCheck`, which asks the driver's flag actor at most once a second)."""
    return stop is not None and stop.is_set()


IO_THREADS = 16     # concurrent reads / writes of one block's objects on an object store (latency-bound)


def _timed(fn, *args):
    t0 = time.perf_counter()
    try:
        return fn(*args), time.perf_counter() - t0
    except Exception as e:
        return e, time.perf_counter() - t0


def _each(fn, args: list[tuple], remote: bool) -> list:
    """``fn(*a)`` for each of ``args`` as (result or exception, seconds): in threads when the objects are remote
    (an S3 GET or PUT waits on the network far longer than it works), one after the other on local disk."""
    if remote and len(args) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(IO_THREADS, len(args))) as pool:
            return list(pool.map(lambda a: _timed(fn, *a), args))
    return [_timed(fn, *a) for a in args]


def load(batch: pa.Table, max_pixels: int, env: dict, stop=None, image_column: str | None = None) -> pa.Table:
    """read + decode. Once the run is draining, inputs not yet decoded are passed on as ``not_started`` (no
    manifest row: the next run does them)."""
    _apply(env)
    rows = Rows(batch)
    todo = []
    for i, row in enumerate(rows):
        row["started_at"] = _now()
        if not row.get("status"):
            todo.append(i)
    if todo and _stopping(stop):                # draining: nothing of this block is read
        for i in todo:
            rows[i]["status"] = NOT_STARTED
        todo = []
    members = [i for i in todo if rows[i].get("tar_offset") is not None]     # WebDataset members: by tar
    read = shards.read_members([(rows[i]["source_uri"][:-len(rows[i]["tar_member"]) - 1], rows[i]["tar_offset"],
                                 rows[i]["source_bytes"] or 0, rows[i].get("tar_sidecars")) for i in members])
    got = {}
    for i, (data, side, t_read) in zip(members, read):
        got[i] = (data, t_read)
        rows[i]["sidecar_tar"] = side
    cells = [i for i in todo if rows[i].get("pq_row_group") is not None]  # Parquet rows: by file and row group
    got.update(zip(cells, shards.read_rows([(rows[i]["source_uri"][:-len(rows[i]["tar_member"]) - 1],
                                             rows[i]["pq_row_group"], rows[i]["pq_row"]) for i in cells],
                                           image_column)))
    files = [i for i in todo if i not in got]
    uris = [rows[i]["source_uri"] for i in files]
    got.update(zip(files, _each(storage.read_bytes, [(u,) for u in uris], not all(storage.is_local(u) for u in uris))))
    for i in todo:
        data, t_read = got[i]
        row = rows[i]
        if _stopping(stop):
            row["status"] = NOT_STARTED
            continue
        if isinstance(data, Exception):
            fail_row(row, "read_error", data)
            continue
        row["t_read_s"] = t_read
        decode_into(row, data, max_pixels)
    return rows.table(FLIGHT)


def decode_into(row: Row, data: bytes, max_pixels: int) -> None:
    """Decode an input's bytes into ``row``: its pixels, sizes, mode, profile and warning, or its failure
    (decode_error, too_large). Never raises."""
    t1 = time.perf_counter()
    row["source_bytes"] = len(data)
    w, h, mode, _ = codec.probe(data)
    row["source_width"], row["source_height"], row["source_mode"] = w, h, mode
    try:
        img = codec.decode(data, max_pixels)
    except codec.DecodeError as e:
        fail_row(row, e.status, str(e))
        return
    except Exception as e:  # a decoder bug must not take the batch down
        fail_row(row, "decode_error", e)
        return
    row["t_decode_s"] = time.perf_counter() - t1
    row["source_width"], row["source_height"], row["source_mode"] = img.width, img.height, img.mode
    row["icc"], row["warning"] = img.icc, img.warning
    _pack(row, img.pixels, img.alpha)


class ModelStage:
    """The actor: the model is loaded once, then every batch goes through it."""

    def __init__(self, model: str, scale: float | None, options: dict, threads: int | None,
                 max_output_pixels: int, batch_size: int, env: dict, stop=None,
                 where: tuple[str | None, str | None] = (None, None), gpus: float | None = None,
                 in_actor: bool = False, expect_sha256: str | None = None, expect_contract: dict | None = None):
        """``where``: (node id, worker id) of the process the stage runs in, recorded in every row. ``gpus``: the
        GPUs the actor was given (0: the CPU, even where CUDA is visible; more: CUDA or CudaUnusable; None: CUDA
        when usable). ``in_actor``: this is a Ray actor, which :meth:`die` may end. ``expect_sha256``: the weights
        the run's driver checked and its rows record, ``expect_contract`` its inference contract (config.pixel_contract;
        ModelChanged when the model loaded here has others)."""
        _apply(env)
        self.stop, self.batch_size, self.in_actor = stop, batch_size, in_actor
        import torch

        from imgxlate.infer.predictor import DeviceFailed, PredictOptions, Predictor, choose_device

        self.device_failed = DeviceFailed       # (stages is imported where torch is not: the I/O tasks)
        if threads:
            torch.set_num_threads(threads)
        self.predictor = Predictor(model, scale, device=choose_device(gpus), options=PredictOptions(**options))
        check_same_model(model, (getattr(self.predictor.model, "meta", None) or {}).get("weights_sha256"),
                         expect_sha256, pixel_contract(self.predictor.contract), expect_contract)
        self.predictor.halt = getattr(stop, "halted", None)     # (the driver's process: a second Ctrl-C)
        self.node_id, self.worker_id = where
        self.max_output_pixels = max_output_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = Rows(batch)
        todo = []
        draining = _stopping(self.stop)
        for i, row in enumerate(rows):
            row["node_id"], row["worker_id"] = self.node_id, self.worker_id
            if row.get("status"):
                continue
            if draining:                  # read but not yet run: nothing was written, the next run does it
                row["status"], row["pixels"], row["alpha"], row["icc"] = NOT_STARTED, None, None, None
                continue
            px, alpha = _unpack(row)
            s = self.predictor.scale
            out_px = round(px.shape[0] * s) * round(px.shape[1] * s)
            if out_px > self.max_output_pixels:
                fail_row(row, "too_large", f"output of {out_px / 1e6:.1f} MP exceeds the max-output-pixels "
                                        f"limit of {self.max_output_pixels / 1e6:.1f} MP")
                continue
            todo.append((i, px, alpha))
        t0 = time.perf_counter()
        results = []
        for j in range(0, len(todo), self.batch_size):
            try:
                results += self.predictor.run([(px, alpha) for _, px, alpha in todo[j:j + self.batch_size]])
            except self.device_failed as e:
                self.die(e)
                raise
        per_image = (time.perf_counter() - t0) / max(1, len(todo))
        for (i, _, _), res in zip(todo, results):
            row = rows[i]
            row["t_model_s"] = per_image
            if isinstance(res, Exception):
                fail_row(row, "model_error", res)
                continue
            row["output_height"], row["output_width"] = res.pixels.shape[:2]
            row["precision"] = res.precision
            _pack(row, res.pixels, res.alpha)
        return rows.table(FLIGHT)


    def die(self, e: BaseException) -> None:
        """End this process, a model actor (``in_actor``): its device failed for good (a sticky CUDA error). Ray
        restarts the actor (max_restarts) and retries its block on the new one; an input that breaks the device
        every time ends, after the retries, as a model_error row (job.retry_lost). Outside an actor (MapImages
        called in a notebook) nothing ends: the caller gets the DeviceFailed."""
        from imgxlate.log import log

        if not self.in_actor:
            return
        log(f"model actor on {os.uname().nodename} exits: {e}")
        os._exit(70)                            # a crash to Ray (restart + retry), not an intentional exit


class FusedStage(ModelStage):
    """load, the model and save in one actor call: no task hop and no pixels through the object store between
    them. The default when the actors run on CPUs, whose time the model, the codecs and the I/O share anyway."""

    def __init__(self, load_kw: dict, save_kw: dict, **settings):
        super().__init__(**settings)
        self.load_kw, self.save_kw = load_kw, save_kw

    def __call__(self, batch: pa.Table) -> pa.Table:
        return save(super().__call__(load(batch, stop=self.stop, **self.load_kw)), **self.save_kw)


def _write(uris: list[str], datas: list[bytes], tmp_dir: str | None) -> list[tuple[Exception | None, float]]:
    """Write each output: (None or why it failed, seconds). Local outputs go through DST/_manifest/_tmp
    (``tmp_dir``, see :class:`storage.LocalWrites`) and are durable when this returns, so that their rows may be
    recorded: one sync per block, its time shared out over the block's rows."""
    if not uris or not all(storage.is_local(u) for u in uris):
        return _each(storage.write_bytes, list(zip(uris, datas)), True)
    writes = storage.LocalWrites(tmp_dir)
    paths = [storage.local_path(u) for u in uris]
    try:
        wrote = _each(writes.write, list(zip(paths, datas)), False)
    finally:
        t0 = time.perf_counter()
        failed = writes.sync()
        share = (time.perf_counter() - t0) / len(uris)
    return [(res if isinstance(res, Exception) else failed.get(os.path.dirname(p)), t + share)
            for p, (res, t) in zip(paths, wrote)]


def encode_row(row: Row, fmt: str, quality: int, png_level: int | None = codec.PNG_LEVEL) -> bytes | None:
    """The encoded output of a row the model made (None for a failed row, or when encoding failed: then the row
    says so, as a write_error). Never raises."""
    if row.get("status"):
        return None
    row["output_format"] = fmt
    px, alpha = _unpack(row)
    if lost := codec.profile_lost(fmt, px, row.get("icc")):
        row["warning"] = "; ".join(w for w in (row.get("warning"), lost) if w)
    t0 = time.perf_counter()
    try:
        data = codec.encode(px, alpha, fmt, quality, row.get("icc"), png_level)
    except Exception as e:
        fail_row(row, "write_error", f"encode failed: {type(e).__name__}: {e}")
        return None
    row["t_encode_s"] = time.perf_counter() - t0
    return data


def save(batch: pa.Table, fmt: str, quality: int, model_id: str, model_sha256: str, task: str,
         env: dict, tmp_dir: str | None = None, pieces_dir: str | None = None,
         png_level: int | None = codec.PNG_LEVEL) -> pa.Table:
    """encode + write (``tmp_dir``: :func:`storage.temporaries_dir` of a local DST). Rows bound for a shard's one
    object (``out_member`` set) are written together as one piece under ``pieces_dir`` (see
    :mod:`imgxlate.infer.pieces`). Returns manifest rows (no pixels); an ``ok`` row's output is durable."""
    _apply(env)
    rows = Rows(batch)
    out = []                                       # (row index, encoded bytes)
    for i, row in enumerate(rows):
        row["model_id"], row["model_sha256"], row["task"] = model_id, model_sha256, task
        if (data := encode_row(row, fmt, quality, png_level)) is not None:
            out.append((i, data))
    whole = [(i, d) for i, d in out if rows[i].get("out_member")]
    out = [(i, d) for i, d in out if not rows[i].get("out_member")]
    uris = [rows[i]["output_uri"] for i, _ in out]
    wrote = _write(uris, [d for _, d in out], tmp_dir)
    if whole:                   # --output-format webdataset / parquet: one piece of the shard's object per block
        data = b"".join(shards.fragment([(member := rows[i]["out_member"], d),
                                         *shards.renamed(rows[i]["sidecar_tar"], member)]) for i, d in whole)
        first = rows[whole[0][0]]
        piece = pieces.piece_uri(pieces_dir, first["run_id"], first["shard"], first["seq"] or 0,
                                 [rows[i]["source_uri"] for i, _ in whole])
        res, t_write = _write([piece], [data], tmp_dir)[0]
        out += whole
        wrote += [(res, t_write / len(whole))] * len(whole)
    for (i, data), (res, t_write) in zip(out, wrote):
        row = rows[i]
        if res is not None:
            fail_row(row, "write_error", f"{storage.DST_FAILURE}{why}: {type(res).__name__}: {res}"
                  if (why := storage.dst_failure(res)) else res)
        else:
            row["t_write_s"] = t_write
            row["status"], row["output_bytes"] = "ok", len(data)
            row["output_sha256"] = hashlib.sha256(data).hexdigest()
    for row in rows:
        row["finished_at"] = _now()
        row["source_uri"] = redact(row["source_uri"])
    table = rows.table(manifest.SCHEMA)
    counters.count(table.filter(pc.not_equal(table.column("status"), NOT_STARTED)))
    return table
