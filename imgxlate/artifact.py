"""The model artifact: a folder (local or any fsspec URI, s3:// included) holding

    weights.pt   the state_dict, written with torch.save and read with weights_only=True
    config.json  architecture, config, task, scale, the inference contract (how the model must be
                 run: imgxlate.infer.contract), checksum, provenance, metrics

``config.json`` is written last, so a folder without it is an unfinished save and is refused.
Loading never runs code from the file: a pickled object other than tensors is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import pickle

import torch
from torch import nn

import imgxlate
from imgxlate.errors import CannotRun
from imgxlate.io import storage

FORMAT = "imgxlate-model"
FORMAT_VERSION = 1
WEIGHTS = "weights.pt"
CONFIG = "config.json"

class ArtifactError(CannotRun, RuntimeError):
    """A model artifact that is not there or cannot be read: a command stops with its one line and exit 2."""


class UnsafeWeightsError(ArtifactError):
    pass


def read_state_dict(uri: str) -> dict:
    """A state_dict from a local path or URI, refusing anything but tensors and plain containers."""
    data = storage.read_bytes(uri)
    return state_dict_from_bytes(data, uri)


def state_dict_from_bytes(data: bytes, what: str = "weights") -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeWeightsError(
            f"{what}: refused to load: the file holds pickled objects other than tensors "
            f"(loading it could run arbitrary code). Save a plain state_dict instead. Details: "
            f"{str(e).splitlines()[0]}"
        ) from e
    if not isinstance(state, dict):
        raise UnsafeWeightsError(f"{what}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return state


def model_id(meta: dict) -> str:
    return f"{meta['arch']}-x{meta['scale']:g}-{meta['weights_sha256'][:12]}"


def save(model: nn.Module, uri: str, provenance: dict | None = None, metrics: dict | None = None,
         contract=None, precision_cost: dict | None = None) -> dict:
    """Write ``model`` as an artifact folder at ``uri``; returns the config.json contents. ``contract``
    (an :class:`imgxlate.infer.contract.Contract`) says how it must be run; by default, the task's.
    ``precision_cost``: the quality a reduced precision costs against fp32, e.g. {"bf16": {"psnr_db": 0.002,
    "on": "..."}}, which ``--amp auto`` consults (imgxlate.infer.precision)."""
    from imgxlate.infer.contract import from_meta

    contract = contract or from_meta({"provenance": provenance or {}}, model.task)   # what training implies
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "task": model.task,
        "scale": model.scale,
        "config": dataclasses.asdict(model.config),
        "normalisation": contract.normalisation,
        "contract": contract.to_dict(),
        "weights_file": WEIGHTS,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "imgxlate_version": imgxlate.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    if precision_cost:
        meta["precision_cost"] = precision_cost
    meta["model_id"] = model_id(meta)
    storage.remove(storage.join(uri, CONFIG))   # over an artifact: a save cut short between the two files reads as
                                                # unfinished, never as the old config with the new weights
    storage.write_bytes(storage.join(uri, WEIGHTS), data)
    storage.write_bytes(storage.join(uri, CONFIG), json.dumps(meta, indent=2).encode())
    return meta


def read_meta(uri: str) -> dict:
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, CONFIG)))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ArtifactError(f"{uri}: no {CONFIG}: not a model artifact, or its save did not finish") from e
    except ValueError as e:                     # not JSON, or not UTF-8
        raise ArtifactError(f"{uri}: its {CONFIG} is damaged ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{uri}: not an {FORMAT} v{FORMAT_VERSION} artifact")
    return meta


def load(uri: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved at ``uri``, in eval mode, with its metadata as ``model.meta``."""
    from imgxlate.models import build

    meta = read_meta(uri)
    data = storage.read_bytes(storage.join(uri, meta["weights_file"]))
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise ArtifactError(f"{uri}: weights do not match the checksum in {CONFIG} (corrupt or replaced)")
    model = build(meta["arch"], meta["config"])
    model.load_state_dict(state_dict_from_bytes(data, f"{uri}/{meta['weights_file']}"))
    model.meta = meta
    return model.to(device).eval()
