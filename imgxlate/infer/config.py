"""What a batch run is asked to do: its options (:class:`TranslateConfig`), the checks made before any work,
the model's identity, and the recipe (what decides an output's pixels, so a rerun knows what is done)."""

from __future__ import annotations

import gc
import hashlib
import json
import re
from dataclasses import dataclass

from imgxlate.errors import CannotRun
from imgxlate.io import codec, keys, listing, shards, storage
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
    input_format: str = "auto"           # files, webdataset (tar shards), parquet (a column of image bytes);
                                         # auto: parquet with --image-column, webdataset for a .tar SRC or a brace
                                         # pattern of them, else files
    image_column: str | None = None      # Parquet SRC: the column of encoded image bytes
    key_column: str | None = None        # Parquet SRC: the column naming each row (default: its row number)
    output_format: str = "files"         # files (one object per input), webdataset (one tar per shard) or parquet
                                         # (one Parquet file per shard: manifest columns + the output's bytes)
    quality: int = 95
    png_level: int | None = None         # zlib level of PNG outputs (None: 1 with RLE, codec.PNG_LEVEL): size and
                                         # time, never pixels, so not in the recipe
    extensions: tuple[str, ...] = listing.IMAGE_EXTS
    limit: int | None = None
    max_pixels: int = codec.DEFAULT_MAX_PIXELS
    max_output_pixels: int = 256_000_000
    tile: int | None = None              # None: 256 on CPU, 1024 on GPU
    overlap: int = 32
    amp: str = "auto"                    # auto, bf16, fp16 or off: imgxlate.infer.precision; resolved once, in the
                                         # driver, for the actors' device kind (device_kind)
    compile: bool = False                # torch.compile the model in each actor (a failed compile runs eagerly)
    cutout: bool = False
    actors: int | None = None            # default: one per GPU; on CPUs one per cpus_per_actor (fused)
    max_actors: int | None = None        # the pool grows to this many as the cluster adds nodes; default: on GPUs
                                         # no limit but the cluster's, on CPUs a fixed pool of --actors
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
                                         # the actors; in-process: the same stages in this process, no Ray;
                                         # auto: in-process for a small run on this machine's CPUs
                                         # (inprocess.chosen), else fused on CPU actors, split on GPU actors


PATH_OPTIONS = ("src", "dst", "model")          # os.PathLike accepted: the Python API, MapImages


def typed_options(options: dict, who: str) -> dict:
    """Keyword options (the Python API, MapImages) made TranslateConfig's field types, as the command's parser
    makes them from its flags: numpy numbers as Python ones, an int where a float is asked, a pathlib.Path for
    SRC, DST and the model, ``extensions`` as a comma-separated string or a list. JobError, naming the option and
    what it takes, for anything else (``tile="512"``, ``tile=512.0``, ``cutout="yes"``)."""
    import numbers
    import os
    import types
    import typing

    import numpy as np

    hints, out = typing.get_type_hints(TranslateConfig), {}
    for name, value in options.items():
        hint = hints.get(name)
        if hint is None:
            out[name] = value
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        optional = union and type(None) in typing.get_args(hint)
        kind = next(k for k in typing.get_args(hint) if k is not type(None)) if union else hint
        base = typing.get_origin(kind) or kind
        if value is None and optional:
            out[name] = None
        elif base is bool and isinstance(value, (bool, np.bool_)):
            out[name] = bool(value)
        elif base in (int, float) and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            out[name] = base(value)
        elif base is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[name] = float(value)
        elif base is str and (isinstance(value, str) or name in PATH_OPTIONS and isinstance(value, os.PathLike)):
            out[name] = os.fspath(value)
        elif base is tuple and isinstance(value, (str, list, tuple)) and all(isinstance(v, str) for v in value):
            found = tuple(e.strip() for v in ([value] if isinstance(value, str) else value)
                          for e in v.split(",") if e.strip())
            if not found:
                raise JobError(f"{who}: {name}={value!r} names no extension (e.g. 'png,jpg' or ['png', 'jpg'])")
            out[name] = found
        else:
            want = {bool: "True or False", int: "an int", float: "a number", tuple: "a list of strings",
                    str: "a string" + (" or a pathlib.Path" if name in PATH_OPTIONS else "")}[base]
            raise JobError(f"{who}: {name}={value!r} is a {type(value).__name__}; give {want}"
                           + (" or None" if optional else ""))
    return out


def model_info(cfg: TranslateConfig) -> dict:
    """The model's identity (model_id, sha256, task, scale), once it has been loaded here, in the driver, before
    Ray starts, as each model actor will load it: its weights against the checksum in its config.json, its
    architecture built and the weights loaded into it strictly, its scale against --scale, its task against
    --cutout and its tile against --tile / --overlap (see check_tiles); then it is freed. JobError, one line, when
    any of it fails, so that a model that cannot run never reaches the actors."""
    from imgxlate.infer import precision
    from imgxlate.infer.contract import from_meta
    from imgxlate.infer.predictor import resolve_model

    kind = device_kind(cfg)
    try:
        model = resolve_model(cfg.model, cfg.scale if cfg.model == "bicubic" else None, "cpu")
        meta, task, scale = dict(getattr(model, "meta", None) or {}), model.task, model.scale
        contract = from_meta(meta or None, task)
        prec, why = precision.resolve(cfg.amp, kind, model, probe=False)
        exact = precision.exact(model)
    except precision.PrecisionError as e:
        raise JobError(str(e)) from None
    except Exception as e:
        raise JobError(f"model {redact(cfg.model)}: {_one_line(e, cfg.model)}") from e
    finally:
        model = None                     # the actors load their own copy: none is kept in the driver
        gc.collect()
    if cfg.scale is not None and task == "sr" and scale != cfg.scale:
        raise JobError(f"model {redact(cfg.model)} is x{scale:g}, but --scale {cfg.scale:g} was given")
    if cfg.cutout and task != "seg":
        raise JobError(f"--cutout writes a segmentation model's cut-out, but {redact(cfg.model)} is a {task} model: "
                       f"leave --cutout out")
    if task == "seg" and not cfg.cutout and cfg.format != "png":
        raise JobError(f"{redact(cfg.model)} writes 0/255 masks, which {cfg.format} would not keep (it is lossy): use "
                       f"--format png (or --cutout, whose {cfg.format} output is the image on white where cut out)"
                       if cfg.format == "jpeg" else f"{redact(cfg.model)} writes 0/255 masks, which {cfg.format} "
                       f"would not keep (it is lossy): use --format png")
    check_tiles(cfg, contract.tile if contract.geometry == "native" else None, redact(cfg.model))
    resolved = {"precision": prec, "precision_reason": why, "device_kind": kind, "exact": exact,
                "contract": pixel_contract(contract)}
    if cfg.model == "bicubic":
        return {"model_id": f"bicubic-x{scale:g}", "sha256": "", "task": "sr", "scale": scale, **resolved}
    return {"model_id": meta["model_id"], "sha256": meta["weights_sha256"], "task": task, "scale": meta["scale"],
            **resolved}


def pixel_contract(contract) -> dict:
    """The fields of a model's inference contract that decide output pixels (its normalisation is a description):
    a recipe hashes them, and a model stage checks that the artifact it loaded has the driver's."""
    d = contract.to_dict()
    d.pop("normalisation", None)
    return d


class ModelChanged(JobError):
    """The model artifact was replaced after the run's driver checked it: the weights a model stage loaded are not
    the ones the run's rows record (a model retrained to the same path, a copy over it, a moved ``latest``)."""


def check_same_model(spec: str, got: str | None, expect_sha256: str | None, got_contract: dict | None = None,
                     expect_contract: dict | None = None) -> None:
    """ModelChanged unless the weights just loaded from ``spec`` (sha256 ``got``) are the ones ``expect_sha256``
    names, and its inference contract (pixel_contract) the one ``expect_contract`` gives (config.json edited: a
    mask threshold, say). Outputs of two models in one run would each be recorded as the first's; none is made
    with the other."""
    if expect_contract is not None and got_contract is not None and got_contract != expect_contract:
        changed = ", ".join(f"{k} {expect_contract.get(k)!r} -> {got_contract.get(k)!r}"
                            for k in sorted(set(expect_contract) | set(got_contract))
                            if expect_contract.get(k) != got_contract.get(k))
        what, new = f"its inference contract (config.json) now says {changed}", "contract"
    elif expect_sha256 and got != expect_sha256:
        what, new = f"its weights are now sha256 {str(got)[:12]}", "model"
    else:
        return
    import socket

    record = f": the run's rows record {expect_sha256[:12]}" if new == "model" else ""
    text = (f"model {redact(spec)} changed after this run started: {what} on node {socket.gethostname()}{record}, "
            f"so nothing more is made with it. Put the model the run started with back and rerun to finish it, or "
            f"rerun as it is to make every output again with the new {new} (a new recipe)")
    raise ModelChanged(text)        # one line in a traceback, which the driver reads the node from (job._node_of)


INPUT_FORMATS = ("auto", "files", "webdataset", "parquet")
PIPELINES = ("auto", "in-process", "fused", "split")
OUTPUT_FORMATS = ("files", "webdataset", "parquet")


def input_format(cfg: TranslateConfig) -> str:
    """'webdataset' or 'files': what SRC holds (--input-format, or told by SRC's name when auto)."""
    if cfg.input_format != "auto":
        return cfg.input_format
    if cfg.image_column:
        return "parquet"
    return "webdataset" if shards.is_webdataset(cfg.src) else "files"


def device_kind(cfg: TranslateConfig) -> str:
    """'cuda' or 'cpu': the device the model actors will run on, as the driver can tell before Ray starts, for
    resolving --amp once for the whole run. --gpus-per-actor says it; without it, GPU actors are what a local Ray
    on a machine with a GPU gives, and what --amp fp16 asks for. (A driver without a GPU joined to a GPU cluster
    resolves for CPUs unless --gpus-per-actor is given: auto then keeps fp32 where this CPU lacks native bf16.)"""
    if cfg.gpus_per_actor is not None:
        return "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() or cfg.amp == "fp16" else "cpu"


def actor_amp(meta: dict) -> str:
    """The --amp the model actors are given: the precision resolved in the driver (model_info), so that every
    row of a run is made at one precision whatever node runs it."""
    return {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}[meta["precision"]]


def stage_settings(cfg: TranslateConfig, meta: dict, stop=None) -> tuple[dict, dict, dict]:
    """(load_kw, save_kw, settings): the keyword arguments of :mod:`imgxlate.infer.stages`' load, save and
    ModelStage / FusedStage for this run, the same for Ray's actors and tasks (raydata.build) and for a run in the
    driver's process (inprocess.py), so that the two make the same bytes. ``stop``: what the stages ask whether
    the run is draining."""
    from imgxlate.infer import pieces

    env = {"AWS_ENDPOINT_URL": storage.endpoint_from_env() or ""}
    load_kw = {"max_pixels": cfg.max_pixels, "env": env, "image_column": cfg.image_column}
    save_kw = {"fmt": cfg.format, "quality": cfg.quality, "png_level": cfg.png_level, "model_id": meta["model_id"],
               "model_sha256": meta["sha256"], "task": meta["task"], "env": env,
               "tmp_dir": storage.temporaries_dir(cfg.dst), "pieces_dir": pieces.pieces_dir(cfg.dst)}
    options = {"tile": cfg.tile, "overlap": cfg.overlap, "amp": actor_amp(meta), "cutout": cfg.cutout,
               "compile": cfg.compile}
    settings = {"model": cfg.model, "scale": cfg.scale, "options": options, "threads": cfg.threads_per_actor,
                "max_output_pixels": cfg.max_output_pixels, "batch_size": cfg.batch_size, "env": env, "stop": stop,
                "expect_sha256": meta["sha256"] or None, "expect_contract": meta["contract"]}
    return load_kw, save_kw, settings


def _one_line(e: BaseException, spec: str) -> str:
    """An exception as one line, without the model's own name at its start (the message gives it)."""
    text = " ".join(str(e).split()) or type(e).__name__
    for name in (spec, redact(spec)):
        if text.startswith(name + ": "):
            text = text[len(name) + 2:]
    return text if len(text) <= 400 else text[:397] + "..."


MIN_OVERLAP = 8          # input pixels: blending ignores the outer quarter of the overlap (2 px at 8), the pixels
                         # of a tile that saw its padding instead of their neighbours
AUTO_TILE = {"cpu": 256, "cuda": 1024}   # the tile the Predictor picks by itself (imgxlate.infer.predictor.AUTO)
DEFAULT_OVERLAP = TranslateConfig.overlap
WHOLE = 1 << 20          # a contract's tile this large means: never tiled (imgxlate.external)


def check_tiles(cfg: TranslateConfig, model_tile: int | None, model: str) -> None:
    """--tile and --overlap against what gives the untiled output at tile seams (within a code): the overlap at
    least MIN_OVERLAP and at most half the tile (else the Predictor would blend over something else than was
    asked), and a model that must be run in tiles of its own size (a style model: its training crop) only in
    those. The default overlap is cut to a quarter of such a model's tile, as the Predictor does."""
    if cfg.tile is not None and cfg.tile < 2 * MIN_OVERLAP:
        raise JobError(f"--tile {cfg.tile} is too small: a tile must be at least {2 * MIN_OVERLAP} px (twice the "
                       f"smallest --overlap, {MIN_OVERLAP})")
    if model_tile and cfg.tile is not None and cfg.tile != model_tile:
        if model_tile >= WHOLE:
            raise JobError(f"--tile {cfg.tile}: {model} must be run on whole images (its architecture does not "
                           f"tile): leave --tile out")
        raise JobError(f"--tile {cfg.tile}: {model} must be run in tiles of {model_tile} px (its training crop; its "
                       f"outputs depend on the tile's size): leave --tile out, or give --tile {model_tile}")
    tile = cfg.tile or model_tile
    if tile and 2 * cfg.overlap > tile and not (cfg.tile is None and cfg.overlap == DEFAULT_OVERLAP):
        given = f"--tile {cfg.tile}" if cfg.tile is not None else f"{model}'s tile of {tile} px"
        raise JobError(f"{given} must be at least twice --overlap ({cfg.overlap}), or neighbouring tiles would "
                       f"be blended over less than was asked: give --overlap {tile // 2} or "
                       f"less, or a --tile of at least {2 * cfg.overlap}")
    kind = device_kind(cfg)
    if not tile and 2 * cfg.overlap > AUTO_TILE[kind]:
        raise JobError(f"--overlap {cfg.overlap} is more than half the tile the job picks by itself on "
                       f"{'CPU' if kind == 'cpu' else 'GPU'} ({AUTO_TILE[kind]} px): give a --tile of at least "
                       f"{2 * cfg.overlap} with it")


def recipe(cfg: TranslateConfig, meta: dict) -> str:
    """Hash of what decides an output's pixels: the model (id and checksum) and every option that
    changes them, the precision the run resolved among them. A rerun skips an input only when its earlier
    ``ok`` row has the same recipe (or one of equivalent_recipes). ``--compile`` is not in it: a compiled model
    computes what the eager one does, up to float rounding."""
    return _hash(cfg, meta, {"precision": meta["precision"], "contract": meta["contract"]})


def equivalent_recipes(cfg: TranslateConfig, meta: dict) -> tuple[str, ...]:
    """Recipes of earlier versions whose outputs this run would make alike. Before the contract was hashed: the
    same recipe without it (a DST made then is not redone for this change; its rows cannot say which contract made
    them). Before that, the --amp option was hashed, not the precision: on CPUs --amp changed nothing (fp32), on
    GPUs bf16 / fp16 / off meant that precision, and a model without parameters always ran in fp32. A DST made
    before precision was resolved is not redone for it."""
    if meta.get("exact") or meta.get("device_kind") == "cpu" and meta["precision"] == "fp32":
        amps = ("bf16", "fp16", "off")
    elif meta.get("device_kind") == "cuda":
        amps = ({"fp32": "off", "bf16": "bf16", "fp16": "fp16"}[meta["precision"]],)
    else:
        amps = ()
    older = (_hash(cfg, meta, {"precision": meta["precision"]}), *(_hash(cfg, meta, {"amp": a}) for a in amps))
    if cfg.model == "bicubic" and float(meta["scale"]).is_integer():    # before _number: --scale 2 hashed 2.0
        older += tuple(_hash(cfg, {**meta, "scale": float(meta["scale"])}, how, as_given=True) for how in (
            {"precision": meta["precision"], "contract": meta["contract"]}, {"precision": meta["precision"]},
            *({"amp": a} for a in amps)))
    return older


def _hash(cfg: TranslateConfig, meta: dict, how: dict, as_given: bool = False) -> str:
    scale = meta["scale"] if as_given else _number(meta["scale"])
    what = {"model_id": meta["model_id"], "model_sha256": meta["sha256"], "scale": scale,
            "cutout": cfg.cutout, "format": cfg.format, "suffix": cfg.suffix, "tile": cfg.tile,
            "overlap": cfg.overlap, "quality": cfg.quality if cfg.format != "png" else None, **how,
            **({"output_format": cfg.output_format} if cfg.output_format != "files" else {})}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _number(x: float) -> int | float:
    """A scale as the recipe hashes it: 2, whether given as 2 or 2.0 (the CLI's --scale is a float, the API's and
    a model's config an int); what earlier versions hashed for an integral float is in equivalent_recipes."""
    return int(x) if float(x).is_integer() else float(x)


RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def _same_place(a: str, b: str) -> bool:
    try:
        if storage.is_local(a) and storage.is_local(b):      # one folder through a symlink too
            return storage.real(a) == storage.real(b)
        return storage.is_local(a) == storage.is_local(b) and storage.location(a) == storage.location(b)
    except Exception:  # an unusable URI is reported by the listing or the preflight
        return False


def check(cfg: TranslateConfig) -> None:
    """Refuse, before any work, what the job must not run with."""
    if cfg.input_format not in INPUT_FORMATS:
        raise JobError(f"unknown --input-format {cfg.input_format!r}: use {', '.join(INPUT_FORMATS)}")
    if input_format(cfg) == "parquet" and not cfg.image_column:
        raise JobError("a Parquet SRC of image bytes needs --image-column, the column that holds them (a .parquet "
                       "SRC without it is a manifest: a list of image URIs)")
    if cfg.image_column and input_format(cfg) != "parquet":
        raise JobError(f"--image-column is for a Parquet SRC of image bytes, not --input-format {cfg.input_format}")
    if cfg.output_format not in OUTPUT_FORMATS:
        raise JobError(f"unknown --output-format {cfg.output_format!r}: use {', '.join(OUTPUT_FORMATS)}")
    if cfg.format not in codec.FORMATS:
        raise JobError(f"unknown --format {cfg.format!r}: use {', '.join(codec.FORMATS)}")
    if cfg.lease not in ("on", "off"):
        raise JobError(f"--lease must be on or off, not {cfg.lease!r}")
    check_pixel_options(cfg)
    for what, uri in (("SRC", cfg.src), ("DST", cfg.dst), ("--model", cfg.model)):
        if ":" in listing.userinfo(uri):
            raise JobError(f"{what} {redact(uri)} has credentials in it, which would end up in logs: give them "
                           f"through the environment (AWS_ACCESS_KEY_ID, ...), a profile or an instance role")
    if cfg.shard_size < 1 or cfg.queued_inputs < 1 or cfg.batch_size < 1:
        raise JobError("--shard-size, --queued-inputs and --batch-size must be at least 1")
    if cfg.cpus_per_actor <= 0 or cfg.io_cpus <= 0:
        raise JobError("--cpus-per-actor and --io-cpus must be more than 0")
    if cfg.max_actors is not None and (cfg.max_actors < 1 or cfg.actors is not None and cfg.max_actors < cfg.actors):
        raise JobError(f"--max-actors {cfg.max_actors} must be at least 1 and at least --actors")
    if (cfg.actors is not None and cfg.actors < 1) or (cfg.gpus_per_actor is not None and cfg.gpus_per_actor < 0) \
            or (cfg.threads_per_actor is not None and cfg.threads_per_actor < 1):
        raise JobError("--actors and --threads-per-actor must be at least 1, and --gpus-per-actor at least 0")
    if cfg.pipeline not in PIPELINES:
        raise JobError(f"unknown --pipeline {cfg.pipeline!r}: use {', '.join(PIPELINES)}")
    if cfg.pipeline == "in-process" and (given := [f for f, v in (
            ("--ray-address", cfg.ray_address), ("--actors", cfg.actors), ("--max-actors", cfg.max_actors),
            ("--gpus-per-actor", cfg.gpus_per_actor)) if v]):
        raise JobError(f"--pipeline in-process runs this process's CPUs, without Ray: {', '.join(given)} would "
                       f"have no effect; leave it out, or use --pipeline fused / split")
    if cfg.run_id is not None and cfg.run_id.startswith("_"):
        raise JobError(f"--run-id {cfg.run_id!r}: names that start with '_' are the job's own folders under "
                       f"DST/_manifest (_shards, _tmp, _verify); start it with a letter or digit")
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
    kind = input_format(cfg)
    if kind != "files" and not shards.is_folder_source(cfg.src) and _same_place(shards.folder_of(cfg.src), cfg.dst):
        raise JobError(f"DST {redact(cfg.dst)} is the folder that holds SRC's {kind} files: the outputs "
                       f"({'<name>.tar / .parquet' if cfg.output_format != 'files' else '<name>.tar/<member>'}) "
                       f"would take the inputs' names; write elsewhere")


def check_pixel_options(cfg: TranslateConfig) -> None:
    """The options that decide output pixels, each against the range that gives what it says (the model's own
    requirements are checked once it is loaded: model_info)."""
    if not 1 <= cfg.quality <= 100:
        raise JobError(f"--quality {cfg.quality} is out of range: JPEG and WebP quality runs from 1 (smallest "
                       f"files) to 100 (best); PNG is lossless and takes none")
    if cfg.png_level is not None and not 0 <= cfg.png_level <= 9:
        raise JobError(f"--png-level {cfg.png_level} is out of range: zlib's levels run from 0 (stored, fastest) to 9 "
                       f"(smallest); the pixels are the same at every level")
    if cfg.overlap < MIN_OVERLAP:
        raise JobError(f"--overlap {cfg.overlap} is too small: tiles must overlap by at least {MIN_OVERLAP} px, "
                       f"or the pixels of a tile that saw its edge show as seams (default {DEFAULT_OVERLAP})")
    if cfg.tile is not None:             # against the model's tile too, once it is loaded (model_info)
        check_tiles(cfg, None, "")
    if cfg.scale is not None and (cfg.scale < 1 or cfg.scale != int(cfg.scale)):
        raise JobError(f"--scale {cfg.scale:g}: the scale must be a whole number (1, 2, 3, 4, ...): at other scales "
                       f"the tiles of a large image do not line up")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise JobError(f"unknown --amp {cfg.amp!r}: use auto, bf16, fp16 or off")
    if cfg.limit is not None and cfg.limit < 1:
        raise JobError(f"--limit {cfg.limit}: give at least 1 (leave it out to process every input)")
    if cfg.max_pixels < 1 or cfg.max_output_pixels < 1 or cfg.max_model_retries < 0:
        raise JobError("--max-pixels must be at least 1 and --max-model-retries at least 0")
