"""What a batch run is asked to do: its options (:class:`TranslateConfig`), the checks made before any work,
the model's identity, and the recipe (what decides an output's pixels, so a rerun knows what is done)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from imgxlate.errors import CannotRun
from imgxlate.io import codec, keys, listing, storage
from imgxlate.io.listing import redact


class JobError(CannotRun, RuntimeError):
    """The job could not run (bad source, unusable destination, bad model): nothing was processed."""


def destination_problem(dst: str, e: BaseException, doing: str = "written") -> str:
    """One line for a person: what is wrong with DST (no bucket, access denied, or the error as it came)."""
    where = redact(dst)
    bucket = where.split("://", 1)[1].split("/", 1)[0] if "://" in where else None
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in str(e):
        return f"destination {where}: bucket '{bucket}' does not exist" if bucket else \
            f"destination {where} cannot be created: {e}"
    if isinstance(e, PermissionError) or "AccessDenied" in str(e) or "403" in str(e):
        return f"destination {where}: access denied" + (f" on bucket '{bucket}'" if bucket else "") + f" ({e})"
    return f"destination {where} cannot be {doing}: {type(e).__name__}: {e}"


@dataclass
class TranslateConfig:
    src: str
    dst: str
    model: str
    scale: float | None = None
    suffix: str = ""
    format: str = "png"
    quality: int = 95
    extensions: tuple[str, ...] = listing.IMAGE_EXTS
    limit: int | None = None
    max_pixels: int = codec.DEFAULT_MAX_PIXELS
    max_output_pixels: int = 256_000_000
    tile: int | None = None              # None: 256 on CPU, 1024 on GPU
    overlap: int = 32
    amp: str = "bf16"
    cutout: bool = False
    actors: int | None = None            # default: one per GPU; on CPUs one per cpus_per_actor (fused)
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    threads_per_actor: int | None = None # torch threads in each actor; default: cpus_per_actor
    batch_size: int = 8                  # images per model run (a model-actor call takes a whole input block)
    io_cpus: float = 0.25                # logical CPUs per read/decode and encode/write task
    ray_address: str | None = None       # None: start Ray in this process
    num_cpus: int | None = None          # logical CPUs when Ray is started here
    s3_endpoint: str | None = None
    run_id: str | None = None
    dry_run: bool = False
    fail_on_error: bool = False
    progress_every_s: float = 5.0
    manifest_every_rows: int = 1000
    max_model_retries: int = 3           # a batch whose model actor dies is retried this often, then model_error
    wait_for_lease_s: float = 0.0        # another run holds DST: wait this long for it, then stop (exit 2)
    lease: str = "on"                    # off: no lease on DST (a store without conditional writes), at the
                                         # user's risk; the summary says so
    shard_size: int = 10_000             # inputs per shard: the unit of manifest parts and of resume
    queued_inputs: int = 20_000          # inputs handed to the pipeline ahead of what it has taken
    pipeline: str = "auto"               # fused: read..write in the model actor's call; split: I/O tasks around
                                         # the actors; auto: fused on CPU actors, split on GPU actors


def model_info(cfg: TranslateConfig) -> dict:
    from imgxlate.infer.predictor import model_meta

    if cfg.model == "bicubic":
        scale = cfg.scale or 2
        return {"model_id": f"bicubic-x{scale:g}", "sha256": "", "task": "sr", "scale": scale}
    try:
        meta = model_meta(cfg.model)
    except Exception as e:
        raise JobError(f"model {redact(cfg.model)}: {e}") from e
    if cfg.scale is not None and meta["task"] == "sr" and meta["scale"] != cfg.scale:
        raise JobError(f"model {redact(cfg.model)} is x{meta['scale']}, but --scale {cfg.scale:g} was given")
    return {"model_id": meta["model_id"], "sha256": meta["weights_sha256"], "task": meta["task"],
            "scale": meta["scale"]}


def recipe(cfg: TranslateConfig, meta: dict) -> str:
    """Hash of what decides an output's pixels: the model (id and checksum) and every option that
    changes them. A rerun skips an input only when its earlier ``ok`` row has the same recipe."""
    what = {"model_id": meta["model_id"], "model_sha256": meta["sha256"], "scale": meta["scale"],
            "cutout": cfg.cutout, "format": cfg.format, "suffix": cfg.suffix, "tile": cfg.tile,
            "overlap": cfg.overlap, "amp": cfg.amp, "quality": cfg.quality if cfg.format != "png" else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def _same_place(a: str, b: str) -> bool:
    try:
        return storage.is_local(a) == storage.is_local(b) and storage.location(a) == storage.location(b)
    except Exception:  # an unusable URI is reported by the listing or the preflight
        return False


def check(cfg: TranslateConfig) -> None:
    """Refuse, before any work, what the job must not run with."""
    if cfg.format not in codec.FORMATS:
        raise JobError(f"unknown --format {cfg.format!r}: use {', '.join(codec.FORMATS)}")
    for what, uri in (("SRC", cfg.src), ("DST", cfg.dst), ("--model", cfg.model)):
        if ":" in listing.userinfo(uri):
            raise JobError(f"{what} {redact(uri)} has credentials in it, which would end up in logs: give them "
                           f"through the environment (AWS_ACCESS_KEY_ID, ...), a profile or an instance role")
    if cfg.shard_size < 1 or cfg.queued_inputs < 1 or cfg.batch_size < 1:
        raise JobError("--shard-size, --queued-inputs and --batch-size must be at least 1")
    if cfg.cpus_per_actor <= 0 or cfg.io_cpus <= 0:
        raise JobError("--cpus-per-actor and --io-cpus must be more than 0")
    if cfg.pipeline not in ("auto", "fused", "split"):
        raise JobError(f"unknown --pipeline {cfg.pipeline!r}: use auto, fused or split")
    if cfg.run_id is not None and (not RUN_ID.fullmatch(cfg.run_id) or ".." in cfg.run_id or cfg.run_id == "."):
        raise JobError(f"--run-id {cfg.run_id!r} names a folder under DST/_manifest: use only letters, digits, "
                       f"'.', '_' and '-' (and not '.' or '..')")
    try:
        keys.check_suffix(cfg.suffix)
    except ValueError as e:
        raise JobError(str(e)) from None
    if _same_place(cfg.src, cfg.dst):
        raise JobError(f"SRC and DST are the same folder or prefix ({redact(cfg.dst)}): the outputs would "
                       f"overwrite the inputs; write elsewhere (a folder inside SRC is fine: it is left out of "
                       f"the listing)")
