"""``--init``: the trained model a run starts from (fine-tuning), grown first where ``--model-config`` asks.

A shipped model's name or an artifact path / URI, of the run's task and of imgxlate's own families; its
architecture and config are the run's. An SR model can grow wider and deeper (``nf``, ``n_blocks``) by
:func:`imgxlate.models.sr.widen`, which keeps what it computes; any other setting that differs from the
trained model's, and ``--preset``, is an error, since the weights fix them; a style or U-Net model does not grow at
all (``--model-config`` beside it may only repeat its config). The driver calls this before any
worker starts (imgxlate.train.run.check_data), so a wrong ``--init`` stops the run with exit 2.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from imgxlate.models import build
from imgxlate.models.sr import grow_to
from imgxlate.train.tasks import DataError, RunConfig


def initial_model(cfg: RunConfig, task: str) -> tuple[nn.Module, list[str]]:
    """The model ``--init`` names, grown as ``--model-config`` asks (SR), and the names of the parameters the
    growth added or widened (what a first ``:new`` stage trains). DataError when it cannot be."""
    from imgxlate.infer.predictor import resolve_model

    check_options(cfg)
    try:
        loaded = resolve_model(cfg.init)
    except Exception as e:
        raise DataError(f"--init {cfg.init}: {e}") from None
    if getattr(loaded, "arch", "") in ("bicubic", "spandrel") or loaded.task != task:
        raise DataError(f"--init {cfg.init}: a {loaded.task} model ({getattr(loaded, 'arch', '?')}); a {task} run "
                        f"starts from a trained {task} model of imgxlate's own families")
    model = build(loaded.arch, loaded.config)           # a plain module: no artifact metadata rides along
    model.load_state_dict(loaded.state_dict())
    if task != "sr":                    # a style or U-Net model does not grow: its weights fix its config
        have = {k: _plain(v) for k, v in dataclasses.asdict(loaded.config).items()}
        if bad := sorted(k for k, v in cfg.model.items() if k not in have or _plain(v) != have[k]):
            raise DataError(f"--init {cfg.init} --model-config: " + ", ".join(
                f"{k} {cfg.model[k]!r} " + (f"(the trained model has {have[k]!r})" if k in have else "(no such field)")
                for k in bad) + f"; a {task} model's weights fix its config (only an SR model grows, by nf / n_blocks)")
        return model, []
    try:
        return grow_to(model, cfg.model, seed=cfg.seed)
    except ValueError as e:
        raise DataError(f"--init {cfg.init} --model-config: {e}") from None


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def check_options(cfg: RunConfig) -> None:
    """--init fixes the architecture: DataError for --preset / --arch beside it."""
    if cfg.init and (cfg.preset or cfg.arch):
        raise DataError(f"--init {cfg.init} fixes the architecture; --preset / --arch cannot go with it (an SR model "
                        f"grows wider / deeper by --model-config's nf / n_blocks)")
