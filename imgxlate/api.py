"""The Python API: the batch job called from Python (a notebook, Airflow, Prefect), as `imgxlate translate` calls
it: ``imgxlate.translate(src, dst, model=..., **options)`` returns the run's summary.

Options are :class:`imgxlate.infer.config.TranslateConfig`'s fields, the command's flags with ``_`` for ``-``
(``tile=512``, ``s3_endpoint=...``, ``fail_on_error=True``). Where the command exits 2 this raises
:class:`~imgxlate.errors.CannotRun` (:class:`~imgxlate.infer.config.JobError`: nothing was done); where it exits
75 or 128+n, :class:`~imgxlate.errors.Stopped` (``DstFailed``, ``Interrupted``: what was done is recorded, and the
exception's ``summary`` says what is left); with ``fail_on_error``, :class:`InputsFailed` where it exits 1.
"""

from __future__ import annotations

import dataclasses
import difflib

from imgxlate.infer.config import TranslateConfig


class InputsFailed(RuntimeError):
    """``fail_on_error``: the run finished, and some inputs failed (their rows say why). ``summary``: the run's."""

    def __init__(self, summary: dict):
        super().__init__(f"{summary['failed']} inputs failed (see the manifest, {summary.get('manifest')})")
        self.summary = summary


def config(src: str, dst: str, model: str, **options) -> TranslateConfig:
    """The run's config from keyword options, each checked to be one of its fields (TypeError, with the nearest
    names, when it is not). A list given for ``extensions`` is taken as a tuple."""
    fields = {f.name for f in dataclasses.fields(TranslateConfig)} - {"src", "dst", "model"}
    for name in options:
        if name not in fields:
            near = difflib.get_close_matches(name, sorted(fields), n=3)
            raise TypeError(f"imgxlate.translate() got an unknown option {name!r}"
                            + (f": did you mean {' or '.join(map(repr, near))}?" if near else
                               f"; the options are {', '.join(sorted(fields))}"))
    if isinstance(options.get("extensions"), (list, str)):
        ext = options["extensions"]
        options["extensions"] = (ext,) if isinstance(ext, str) else tuple(ext)
    return TranslateConfig(src=src, dst=dst, model=model, **options)


def run(cfg: TranslateConfig) -> dict:
    """Run the job as ``cfg`` says; the summary (see :func:`translate`)."""
    from imgxlate.infer import job

    summary = job.run(cfg)
    if cfg.fail_on_error and summary.get("failed"):
        raise InputsFailed(summary)
    return summary


def translate(src: str, dst: str, model: str, **options) -> dict:
    """Run ``model`` over every image under ``src``, writing outputs and the manifest under ``dst``; the run's
    summary (counts by status, bytes, wall time, the manifest's location). A rerun skips what is done. A small
    run (imgxlate/infer/inprocess.py) runs the model in this process, without Ray; any other starts Ray in this
    process, or uses the Ray this process has already started or joined (``ray_address`` / RAY_ADDRESS join a
    cluster)."""
    return run(config(src, dst, model, **options))
