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
import os

from imgxlate.infer.config import TranslateConfig, typed_options


class InputsFailed(RuntimeError):
    """``fail_on_error``: the run finished, and some inputs failed (their rows say why). ``summary``: the run's."""

    def __init__(self, summary: dict):
        super().__init__(f"{summary['failed']} inputs failed (see the manifest, {summary.get('manifest')})")
        self.summary = summary


ALIASES = {"wait_for_lease": "wait_for_lease_s"}     # a flag whose field is named otherwise: --wait-for-lease


def config(src: str, dst: str, model: str, **options) -> TranslateConfig:
    """The run's config from keyword options, each checked to be one of its fields (TypeError, with the nearest
    names, when it is not) and made its type as the command's flags are (CannotRun when it cannot be:
    :func:`imgxlate.infer.config.typed_options`). ``extensions``: a list, or a comma-separated string as the flag
    takes; SRC, DST and the model may be pathlib paths."""
    fields = {f.name for f in dataclasses.fields(TranslateConfig)} - {"src", "dst", "model"}
    options = {ALIASES.get(name, name): value for name, value in options.items()}
    for name in options:
        if name not in fields:
            near = difflib.get_close_matches(name, sorted(fields), n=3)
            raise TypeError(f"imgxlate.translate() got an unknown option {name!r}"
                            + (f": did you mean {' or '.join(map(repr, near))}?" if near else
                               f"; the options are {', '.join(sorted(fields))}"))
    return TranslateConfig(**typed_options({"src": src, "dst": dst, "model": model, **options}, "imgxlate.translate()"))


def run(cfg: TranslateConfig) -> dict:
    """Run the job as ``cfg`` says; the summary (see :func:`translate`)."""
    from imgxlate.infer import job

    before = os.environ.get("AWS_ENDPOINT_URL")
    try:
        summary = job.run(cfg)
    finally:            # s3_endpoint is the run's: later calls and the caller's own clients keep their endpoint
        if cfg.s3_endpoint and before is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        elif cfg.s3_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = before
    if cfg.fail_on_error and summary.get("failed"):
        raise InputsFailed(summary)
    return summary


def translate(src: str, dst: str, model: str, **options) -> dict:
    """Run ``model`` over every image under ``src``, writing outputs and the manifest under ``dst``; the run's
    summary (counts by status, bytes, wall time, the manifest's location). A rerun skips what is done. A small
    run (imgxlate/infer/inprocess.py) runs the model in this process, without Ray; any other starts Ray in this
    process (and shuts it down at the end), or uses the Ray this process has already started or joined
    (``ray_address`` / RAY_ADDRESS join a cluster). Ray Data's settings and the S3 endpoint are set back after it."""
    return run(config(src, dst, model, **options))
