"""Markdown reports: a training run folder (metrics.jsonl -> curves + summary) or a batch job's DST
(its Parquet manifest -> counts by status, throughput, slowest inputs, sample errors)."""

from __future__ import annotations

import json
import os
from collections import Counter

from imgxlate.errors import CannotRun, one_line
from imgxlate.io import manifest, storage
from imgxlate.io.listing import redact
from imgxlate.log import log

TIMES = ("t_read_s", "t_decode_s", "t_model_s", "t_encode_s", "t_write_s")


class NotARun(CannotRun, FileNotFoundError):
    """The folder is neither a training run nor a batch job's DST: there is nothing to report."""


def kind(uri: str) -> str:
    """'training' (a Ray Train run folder with imgxlate/metrics.jsonl), 'batch' (a DST with a manifest)."""
    try:
        if storage.exists(storage.join(uri, "imgxlate", "metrics.jsonl")):
            return "training"
        if manifest.all_runs(uri):
            return "batch"
    except Exception as e:                      # e.g. an s3:// store that cannot be reached
        raise NotARun(f"{redact(uri)}: cannot be read ({type(e).__name__}: {one_line(e, 300)})") from None
    raise NotARun(f"{redact(uri)}: neither a training run folder (imgxlate/metrics.jsonl) nor a "
                            f"batch DST with a manifest (_manifest/<run_id>/)")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return out


def write(run: str, out: str | None = None, slowest: int = 10) -> tuple[str, str | None]:
    """The Markdown report of ``run`` (a training run folder or a batch DST) and where it was written:
    ``out``/report.md, for a training run by default RUN/imgxlate, beside its curves.png."""
    from imgxlate import plots

    if out and storage.is_local(out) and os.path.exists(storage.local_path(out)) and not os.path.isdir(
            storage.local_path(out)):
        raise CannotRun(f"--out {redact(out)}: a file, not a folder the report can be written into")
    if kind(run) == "training":
        text, history = training(run)
        out = out or storage.join(run, "imgxlate")
        if history:
            storage.write_bytes(storage.join(out, "curves.png"),
                                plots.training_curves(history, f"run {run.rstrip('/').split('/')[-1]}"))
    else:
        text = batch(run, slowest=slowest)
    if not out:
        return text, None
    path = storage.join(out, "report.md")
    storage.write_bytes(path, text.encode())
    return text, path


# ------------------------------------------------------------------------------------------ training
def training(run: str) -> tuple[str, list[dict]]:
    """Markdown summary of a training run and its per-epoch history."""
    text = storage.read_bytes(storage.join(run, "imgxlate", "metrics.jsonl")).decode()
    history = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                history.append(json.loads(line))
        except ValueError:                      # a line cut short (a full disk): the others still report
            log(f"warning: {redact(run)}/imgxlate/metrics.jsonl line {n} is not JSON; left out")
    meta = None
    try:
        meta = json.loads(storage.read_bytes(storage.join(run, "model", "config.json")))
    except (FileNotFoundError, ValueError):
        pass
    val_keys = sorted({k for h in history for k, v in h.items() if k.startswith("val_") and isinstance(v, float)})
    lines = [f"# Training run `{run.rstrip('/').split('/')[-1]}`", ""]
    if meta:
        prov = meta.get("provenance", {})
        lines += [f"- model: `{meta['model_id']}` ({meta['arch']}, task {meta['task']}, x{meta['scale']}, "
                  f"{meta.get('n_params', 0):,} parameters), artifact `{storage.join(run, 'model')}`",
                  f"- data: `{prov.get('data')}`; validation: `{prov.get('val') or 'held-out split of the data'}`",
                  f"- workers: {prov.get('workers')}, global batch {prov.get('global_batch')}, "
                  f"steps {prov.get('steps')}, weights: {prov.get('weights', 'raw')}",
                  f"- stages: {json.dumps(prov.get('stages'))}",
                  f"- git revision: {prov.get('git_revision')}"]
    else:
        lines += ["- no model artifact yet (the run has not finished, or finished without exporting)"]
    train_s = sum(h.get("epoch_time_s", 0) for h in history)
    lines += [f"- epochs reported: {len(history)}, training time {train_s / 60:.1f} min (sum of epoch times)"]
    if history:
        last = history[-1]
        lines += ["- final: " + ", ".join(f"{k} {_fmt(last.get(k))}" for k in ["train_loss", *val_keys]
                                           if last.get(k) is not None)]
        for k in val_keys:
            if k.endswith("_bicubic"):
                continue
            vals = [(h[k], i, h) for i, h in enumerate(history, 1) if isinstance(h.get(k), float)]
            if vals:
                higher = any(t in k for t in ("psnr", "ssim", "dice", "iou", "accuracy"))
                v, i, h = (max if higher else min)(vals, key=lambda t: t[0])
                lines.append(f"- best {k}: {v:.4g} at epoch {i} of {len(history)} "
                             f"(stage {h.get('stage', 0)}, its epoch {h.get('epoch')})")
    lines += ["", "![training curves](curves.png)", "", "## Per epoch", ""]
    lines += _table(["#", "stage", "stage epoch", "step", "train_loss", *val_keys, "epoch_time_s"],
                    [[i, h.get("stage"), h.get("epoch"), h.get("global_step", h.get("step")), h.get("train_loss"),
                      *[h.get(k) for k in val_keys], h.get("epoch_time_s")] for i, h in enumerate(history, 1)])
    return "\n".join(lines) + "\n", history


# --------------------------------------------------------------------------------------------- batch
def latest_rows(rows: list[dict], run_ids: list[str]) -> dict[str, dict]:
    """The current state of each input: its row from the newest run that touched it (``run_ids``: oldest first)."""
    rank = {r: i for i, r in enumerate(run_ids)}
    state: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: rank.get(r["run_id"], -1)):
        state[r["key"]] = r
    return state


def _summaries(dst: str, run_ids: list[str], rows: list[dict]) -> list[dict]:
    """Each run's summary.json; a killed run (no summary) summarised from the parts it wrote."""
    summaries = []
    for r in run_ids:
        try:
            summaries.append(json.loads(storage.read_bytes(storage.join(manifest.manifest_root(dst), r,
                                                                         "summary.json"))))
            continue
        except FileNotFoundError:
            pass
        mine = [x for x in rows if x["run_id"] == r]       # killed: no summary, only the parts it wrote
        first = mine[0] if mine else {}
        summaries.append({"run_id": f"{r} (killed: no summary)", "inputs": len(mine), "wall_s": None,
                          "images_per_s": None, "counts": dict(Counter(x["status"] for x in mine)),
                          "output_bytes": sum(x.get("output_bytes") or 0 for x in mine),
                          "dst": redact(dst), "src": "?", "model_id": first.get("model_id"),
                          "task": first.get("task")})
    return summaries


def _moved(written: str, given: str) -> bool:
    """Whether the DST a run recorded is another place than the one given. A local DST recorded relative to where
    its run ran cannot be told apart, and is not said to differ."""
    if written in ("?", given):
        return False
    if storage.is_local(written) != storage.is_local(given):
        return True
    if storage.is_local(written):
        if "://" not in written and not os.path.isabs(written):
            return False
        return os.path.realpath(storage.location(written)) != os.path.realpath(storage.location(given))
    protocol = written.split("://", 1)[0], given.split("://", 1)[0]
    return protocol[0] != protocol[1] or storage.location(written) != storage.location(given)


def batch(dst: str, slowest: int = 10, errors_per_status: int = 3) -> str:
    """Markdown summary of a batch job's DST from its manifest: every run, the current state of every input,
    where the time went, the slowest inputs and sample errors."""
    run_ids = manifest.all_runs(dst)                # oldest first: by when each started
    rows = manifest.read_all(dst).to_pylist()
    summaries = _summaries(dst, run_ids, rows)
    state = latest_rows(rows, run_ids)
    counts = Counter(r["status"] for r in state.values())
    last = summaries[-1]
    here = redact(dst)
    written = next((s["dst"] for s in reversed(summaries)          # the latest translate run that left a summary
                    if "verify" not in s and "(killed" not in str(s["run_id"]) and s.get("dst")), "?")
    lines = [f"# Batch job report: `{here}`", "",          # the DST given: a copied or moved one is reported as such
             *([f"- written as `{written}` (copied or moved since)"] if _moved(written, here) else []),
             f"- model `{last['model_id']}` (task {last['task']}), source `{last['src']}`",
             f"- {len(state)} inputs seen across {len(run_ids)} run(s); current state: " +
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             f"- still failing: {sum(v for k, v in counts.items() if k not in manifest.DONE)}", "", "## Runs", ""]
    lines += _table(["run_id", "inputs", "counts", "wall_s", "images/s", "output MB"],
                    [[s["run_id"], s["inputs"], ", ".join(f"{k} {v}" for k, v in s["counts"].items()),
                      s["wall_s"], s["images_per_s"], round((s.get("output_bytes") or 0) / 1e6, 1)]
                     for s in summaries])
    done = [r for r in rows if r["status"] == "ok"]
    worked = [s for s in summaries if "verify" not in s and any(k != "skipped_done" for k in s["counts"])]
    if done and worked:
        # the latest translate run that processed anything (a resumed run may only skip; verify --redo runs none)
        lines += _throughput(done, worked[-1], slowest)
    lines += _sample_errors([r for r in state.values() if r["status"] not in manifest.DONE], errors_per_status)
    return "\n".join(lines) + "\n"


def _throughput(done: list[dict], w: dict, slowest: int) -> list[str]:
    """Throughput of run ``w``, where the time of every ok row went, and the slowest inputs."""
    mpix = sum((r["source_width"] or 0) * (r["source_height"] or 0) for r in done if r["run_id"] == w["run_id"])
    lines = ["", f"## Throughput (run {w['run_id']}, the latest that processed inputs)", "",
             f"- {w['images_per_s']} images/s, {mpix / 1e6 / w['wall_s']:.2f} input megapixels/s "
             f"over {w['wall_s']} s wall (Ray start-up included)" if w["wall_s"] else "- no wall time recorded"]
    totals = {t: sum(r[t] or 0 for r in done) for t in TIMES}
    whole = sum(totals.values()) or 1
    lines += ["- where the time went (all ok rows, summed over workers): " +
              ", ".join(f"{t[2:-2]} {100 * v / whole:.0f}%" for t, v in totals.items())]
    nodes = Counter(r["node_id"] for r in done if r["node_id"])
    if nodes:
        lines += ["- model work by node: " + ", ".join(f"`{n[:12]}` {c}" for n, c in nodes.most_common())]
    lines += ["", f"## Slowest {min(slowest, len(done))} inputs", ""]
    slow = sorted(done, key=lambda r: -sum(r[t] or 0 for t in TIMES))[:slowest]
    lines += _table(["key", "size", "total_s", *[t[2:-2] for t in TIMES]],
                    [[r["key"], f"{r['source_width']}x{r['source_height']}", sum(r[t] or 0 for t in TIMES),
                      *[r[t] for t in TIMES]] for r in slow])
    return lines


def _sample_errors(failed: list[dict], per_status: int) -> list[str]:
    """Up to ``per_status`` inputs of each failing status, with their errors."""
    if not failed:
        return []
    by_status: dict[str, list] = {}
    for r in failed:
        by_status.setdefault(r["status"], []).append(r)
    table = []
    for status, rs in sorted(by_status.items()):
        table += [[status, r["key"], (r["error"] or "")[:160]] for r in rs[:per_status]]
    return ["", "## Sample errors", "", *_table(["status", "key", "error"], table)]
