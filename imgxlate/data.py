"""imgxlate as one stage of a Ray Data pipeline of your own: :class:`MapImages`.

    import ray
    from imgxlate.data import MapImages

    ds = ray.data.read_parquet("s3://bucket/photos/")                  # a column `image` of encoded bytes
    ds = ds.map_batches(MapImages, fn_constructor_kwargs={"model": "sr-x2"}, batch_size=64,
                        compute=ray.data.ActorPoolStrategy(size=4), num_cpus=1, batch_format="pyarrow",
                        max_task_retries=3)
    ds.write_parquet("s3://bucket/photos-x2/")                          # + `output` and the manifest's columns

Each row's image goes through what ``imgxlate translate`` does to a file (the same decoder, Predictor and
encoder, :mod:`imgxlate.infer.stages`): EXIF orientation, alpha, 16-bit, profiles, tiling, the model's contract
and the precision the job would pick. A row whose bytes are null, not an image or too large gets its status and
error, never an exception: one bad image never fails a block. Rows keep every column they came with.

A GPU left unusable by a sticky CUDA error (an illegal memory access) ends its actor, as in the job: Ray restarts it
and retries the block, so give ``max_task_retries`` (Ray Data's default retries without end).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from imgxlate.infer import counters
from imgxlate.infer.config import JobError, TranslateConfig
from imgxlate.io import manifest

# The manifest's columns that mean something for a row of a table (no files, no runs): what MapImages adds,
# besides the output bytes.
COLUMNS = ("status", "error", "warning", "source_bytes", "source_width", "source_height", "source_mode",
           "output_bytes", "output_width", "output_height", "output_format", "output_sha256", "model_id",
           "model_sha256", "task", "recipe", "precision", "t_decode_s", "t_model_s", "t_encode_s")

# TranslateConfig's fields that decide what MapImages makes (the others are about files, runs and Ray).
OPTIONS = ("scale", "format", "quality", "png_level", "max_pixels", "max_output_pixels", "tile", "overlap", "amp",
           "compile", "cutout", "batch_size")


class MapImages:
    """A callable class for ``Dataset.map_batches``: loads the model once per actor, then maps batches.

    ``column``: the column of encoded image bytes (``image``); ``output_column``: where the output's encoded
    bytes go (``output``; null for a failed row); ``prefix``: put before the names of the manifest's columns it
    adds (``status``, ``error``, ... :data:`COLUMNS`), for a table that has columns of those names already.
    The column holds encoded bytes, or Hugging Face Image structs ({bytes, path}: their bytes are decoded).
    ``threads``: torch threads (default: what Ray gives the actor). The other keyword arguments are
    ``imgxlate translate``'s options of the same names (:data:`OPTIONS`), with the same checks and defaults.

    Takes and returns a pyarrow Table (``batch_format="pyarrow"``), a pandas DataFrame or a dict of numpy arrays.
    """

    def __init__(self, model: str, *, column: str = "image", output_column: str = "output", prefix: str = "",
                 threads: int | None = None, **options):
        from imgxlate.infer import config
        from imgxlate.infer.stages import ModelStage

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"MapImages got unknown option(s) {', '.join(unknown)}: it takes column, output_column, "
                            f"prefix, threads and {', '.join(OPTIONS)}")
        assigned = _ray_assigned()
        options = config.typed_options({"model": model, **options}, "MapImages")
        model = options.pop("model")
        cfg = TranslateConfig(src="", dst="", model=model, gpus_per_actor=assigned.get("GPU"), **options)
        config.check_pixel_options(cfg)
        if cfg.format not in ("png", "jpeg", "webp"):
            raise JobError(f"unknown format {cfg.format!r}: use png, jpeg or webp")
        if cfg.batch_size < 1:
            raise JobError(f"batch_size {cfg.batch_size}: give at least 1")
        self.cfg, self.column, self.output_column = cfg, column, output_column
        self.names = {c: prefix + c for c in COLUMNS}
        if output_column in self.names.values() or output_column == column:
            raise ValueError(f"MapImages: output_column={output_column!r} is the name of "
                             + ("the image column" if output_column == column else "a column it adds (status, error, "
                                "...: COLUMNS)") + ": give another, or a prefix= for the added ones")
        self.meta = config.model_info(cfg)           # the checks and the precision the job makes, for this device
        self.recipe = config.recipe(cfg, self.meta)
        if threads is None and assigned.get("CPU"):
            threads = max(1, int(assigned["CPU"]))
        self.stage = ModelStage(model=model, scale=cfg.scale, threads=threads, env={}, gpus=cfg.gpus_per_actor,
                                in_actor=assigned.get("actor", False), expect_sha256=self.meta["sha256"] or None,
                                expect_contract=self.meta["contract"],
                                max_output_pixels=cfg.max_output_pixels, batch_size=cfg.batch_size,
                                options={"tile": cfg.tile, "overlap": cfg.overlap, "cutout": cfg.cutout,
                                         "amp": config.actor_amp(self.meta), "compile": cfg.compile})

    def __call__(self, batch):
        if isinstance(batch, pa.Table):
            added = self.map(batch.column_names, batch.column(self.column).to_pylist()
                             if self.column in batch.column_names else None, batch.num_rows)
            for name, col in added.items():
                batch = batch.append_column(name, col)
            return batch
        if isinstance(batch, dict):                 # batch_format="numpy"
            import numpy as np

            added = self.map(list(batch), _values(batch.get(self.column)),
                             min((len(v) for v in batch.values()), default=0))
            out = dict(batch)
            for name, col in added.items():
                values = col.to_pylist()
                out[name] = np.empty(len(values), dtype=object)
                out[name][:] = values
            return out
        import pandas as pd

        if isinstance(batch, pd.DataFrame):         # batch_format="pandas": Arrow-backed columns, one schema
            added = self.map(list(batch.columns), _values(batch[self.column] if self.column in batch else None),
                             len(batch))
            out = batch.copy()
            for name, col in added.items():
                out[name] = pd.Series(pd.arrays.ArrowExtensionArray(col), index=batch.index)
            return out
        raise TypeError(f"MapImages takes a pyarrow Table, a pandas DataFrame or a dict of numpy arrays, "
                        f"not {type(batch).__name__}: give map_batches batch_format='pyarrow'")

    def map(self, columns: list[str], data: list | None, rows: int | None = None) -> dict[str, pa.Array]:
        """The columns added to a batch whose columns are ``columns`` and whose image bytes are ``data``:
        the output's bytes, then :data:`COLUMNS`, each as long as ``data``. Images are decoded, run and encoded
        ``batch_size`` at a time, so that a large batch never holds all its pixels at once."""
        if data is None and (not columns or rows == 0):       # an empty block, even one without a schema
            data = []
        if data is None:
            raise KeyError(f"MapImages: the batch has no column {self.column!r} (its columns: {', '.join(columns)}): "
                           f"name the column of encoded image bytes with column=")
        added = [self.output_column, *self.names.values()]
        if clash := [c for c in added if c in columns]:
            raise ValueError(f"MapImages would overwrite the batch's column(s) {', '.join(clash)}: give prefix='...' "
                             f"(put before the manifest's columns) or output_column='...'")
        parts = [self._chunk(data[i:i + self.cfg.batch_size]) for i in range(0, len(data), self.cfg.batch_size)]
        if not parts:
            parts = [self._chunk([])]
        return {name: pa.concat_arrays([p[name] for p in parts]) for name in parts[0]}

    def _chunk(self, data: list) -> dict[str, pa.Array]:
        from imgxlate.infer.stages import FLIGHT, Rows, decode_into, encode_row, fail_row

        rows = Rows(pa.table({"key": pa.nulls(len(data), pa.string())}))
        for row, b in zip(rows, data):
            if b is None or isinstance(b, float) and b != b:          # None, or pandas' NaN
                fail_row(row, "read_error", f"no image: the {self.column!r} value is null")
            elif isinstance(b, dict) and isinstance(b.get("bytes"), (bytes, bytearray)):   # a Hugging Face Image
                decode_into(row, bytes(b["bytes"]), self.cfg.max_pixels)
            elif isinstance(b, dict) and b.get("bytes") is None and isinstance(b.get("path"), str):
                _read_path(row, b["path"], self.cfg.max_pixels)     # decode=False: a path, not its bytes
            elif not isinstance(b, (bytes, bytearray)):
                fail_row(row, "read_error", f"the {self.column!r} value is {type(b).__name__}, not encoded image bytes")
            else:
                decode_into(row, bytes(b), self.cfg.max_pixels)
        rows = Rows(self.stage(rows.table(FLIGHT)))
        outputs = []
        for row in rows:
            row["model_id"], row["model_sha256"] = self.meta["model_id"], self.meta["sha256"]
            row["task"], row["recipe"] = self.meta["task"], self.recipe
            out = encode_row(row, self.cfg.format, self.cfg.quality, self.cfg.png_level)
            if out is not None:
                row["status"], row["output_bytes"] = "ok", len(out)
                row["output_sha256"] = hashlib.sha256(out).hexdigest()
            outputs.append(out)
        table = rows.table(manifest.SCHEMA)
        counters.count(table)
        return {self.output_column: pa.array(outputs, pa.binary()),
                **{self.names[c]: table.column(c).combine_chunks() for c in COLUMNS}}


def _read_path(row, path: str, max_pixels: int) -> None:
    from imgxlate.infer.stages import decode_into, fail_row
    from imgxlate.io import storage

    try:
        data = storage.retry(storage.read_bytes, path)
    except Exception as e:
        fail_row(row, "read_error", f"the image's path {path!r} cannot be read: {type(e).__name__}: {e}")
        return
    decode_into(row, data, max_pixels)


def _values(column) -> list | None:
    """A numpy or pandas column as a list (None when the batch has no such column)."""
    return None if column is None else list(column)


def _ray_assigned() -> dict:
    """The resources Ray gave this actor or task ({'CPU': 1.0, 'GPU': 0.0, ..., 'actor': True}), or {} outside Ray
    (the driver, a notebook). One given no GPU runs on the CPU even where CUDA is visible; one given GPUs needs CUDA
    (CudaUnusable)."""
    try:
        import ray
        from ray._private import worker  # ray: whether this process is a worker (task or actor)

        if not ray.is_initialized() or worker.global_worker.mode != ray.WORKER_MODE:          # ray:
            return {}
        got = dict(ray.get_runtime_context().get_assigned_resources())                        # ray:
        return {**got, "GPU": got.get("GPU", 0.0), "actor": ray.get_runtime_context().get_actor_id() is not None}
    except Exception:
        return {}


__all__ = ["COLUMNS", "OPTIONS", "MapImages"]
