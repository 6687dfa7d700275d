"""The job's counters in Ray's metrics (``ray.util.metrics``), where platform teams look: Ray exports them to
Prometheus from every node (``http://NODE:<MetricsExportPort>/metrics``, as ``ray_imgxlate_*_total``) and Grafana
shows them beside Ray Data's own.

    imgxlate_inputs{status, model_id}      inputs that got a row, by status (ok, decode_error, ...)
    imgxlate_source_bytes{model_id}        bytes of the inputs read
    imgxlate_output_bytes{model_id}        bytes of the outputs written (or, in MapImages, made)
    imgxlate_model_seconds{model_id}       seconds the model ran

Counted where the rows are made: the save stage and MapImages, in whichever worker made them, and the driver for the
model_error rows of inputs whose blocks were lost (job.retry_lost). The manifest is the record, these are for
watching: a block Ray computes twice (its node lost after it was made) is counted twice. Outside Ray nothing is
counted. Counting never fails a row: an error here is logged once and counting stops in that process.
"""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc

_counters: dict | None = None
_broken = False


def _get() -> dict | None:
    global _counters, _broken
    if _counters is None and not _broken:
        if "ray" not in sys.modules:            # a run in the driver's process (inprocess.py): no Ray to count in
            return None
        import ray

        if not ray.is_initialized():
            return None
        from ray.util.metrics import Counter  # ray:

        _counters = {
            "inputs": Counter("imgxlate_inputs", description="inputs that got a manifest row, by status",
                              tag_keys=("status", "model_id")),
            "source_bytes": Counter("imgxlate_source_bytes", description="bytes of the inputs read",
                                    tag_keys=("model_id",)),
            "output_bytes": Counter("imgxlate_output_bytes", description="bytes of the outputs made",
                                    tag_keys=("model_id",)),
            "model_seconds": Counter("imgxlate_model_seconds", description="seconds the model ran",
                                     tag_keys=("model_id",)),
        }
    return _counters


def count(rows: pa.Table) -> None:
    """Add a block's manifest rows (with status, model_id, source_bytes, output_bytes, t_model_s) to the counters."""
    global _broken
    if _broken or not rows.num_rows:
        return
    try:
        counters = _get()
        if counters is None:
            return
        model = {"model_id": rows.column("model_id")[0].as_py() or ""}
        for item in pc.value_counts(rows.column("status")).to_pylist():
            if item["values"]:
                counters["inputs"].inc(item["counts"], tags={"status": item["values"], **model})
        for name, col in (("source_bytes", "source_bytes"), ("output_bytes", "output_bytes"),
                          ("model_seconds", "t_model_s")):
            total = pc.sum(rows.column(col)).as_py()
            if total:
                counters[name].inc(total, tags=model)
    except Exception as e:                    # watching must never cost a row
        _broken = True
        from imgxlate.log import log

        log(f"warning: Ray metrics are off in this worker ({type(e).__name__}: {e})")
