r"""How close the batch job and the model come to the device: one table per machine.

For four models (the shipped `sr-x2`; an EDSR-baseline x2 with random weights, saved as an artifact and loaded by
path; a spandrel Compact x4, Real-ESRGAN's SRVGGNetCompact with 64 features and 16 convs, random weights saved
to a .pth that goes through spandrel like a user's file; the U-Net on a ResNet34 encoder, random weights, as a
seg artifact), at 256 px and at 1920x1080, for each precision asked (`--amps`):

  model-only  Predictor.run on pre-decoded arrays in one process, in calls of the job's batch size, tiled as the
              job tiles, torch at the job's threads per actor: images/s and input megapixels/s
  job         `imgxlate.infer.job.run` over the same images written as PNG files (one job per model and amp,
              over both sizes), in its own driver process (bench_translate's), on one local Ray started once for
              all jobs: its start-up is printed once and left out. Each size's rate comes from the job's own
              manifest: its images over the longest time one model actor took from its first read to its last
              write of them, so the driver's start, the listing and the actors' start are left out too (the
              summary's wall rates are in the JSON)
  ratio       job / model-only; on CPU the job runs one actor per CPU, so it can pass 1
  precision   what the Predictor ran with (Predictor.precision), and on CUDA the GPU's busy fraction
              (utilization.gpu: NVML when pynvml is installed, else nvidia-smi, every 0.2 s) during the
              job's model phase (first start to last finish in its manifest)

Random weights: speed does not depend on them. An amp whose precision is the same as an earlier amp's for a
model (on a CPU without bf16, `auto` keeps fp32) is not measured again, unless --no-reuse. Defaults take under
3 minutes on a 2-CPU machine (1920x1080 is cut to 640x360 there: a 1080p sr-x2 forward takes ~20 s at fp32 on
one CPU thread) and under 8 on one GPU; `--quick` is the CI smoke run (under 90 s on 2 idle CPUs).

    python jobs/bench_device.py --out out/bench_device                  # prints the table, writes results.json
    python jobs/bench_device.py --out out/bench_device --quick          # CI smoke run
    python jobs/bench_device.py --out out/bench_device --amps off,auto,bf16 --models sr-x2,unet --n-hd 8
    python jobs/submit.py --address http://HEAD:8265 -- python jobs/bench_device.py --out /tmp/bench_device
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_translate import _driver  # noqa: E402  (the job's driver process, shared with bench_translate)

MODELS = ("sr-x2", "edsr-baseline", "compact-x4", "unet")
AMPS = ("off", "auto", "bf16", "fp16")
# (small side, small count, HD size, HD count) by device and --quick. On CPU, counts are the job's actor count (one
# per CPU here) so that each actor gets the same work, and HD is 1920x1080 / 4 a side (1/6 with --quick).
PROFILES = {("cpu", False): (256, 2, (480, 270), 2), ("cpu", True): (128, 2, (320, 180), 2),
            ("cuda", False): (256, 256, (1920, 1080), 24), ("cuda", True): (256, 32, (1920, 1080), 4)}


def say(msg: str) -> None:
    print(f"[bench_device] {msg}", flush=True)


def machine(device: str) -> str:
    import torch

    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
        flags = next(x for x in open("/proc/cpuinfo") if x.startswith("flags")).split()
    except (OSError, StopIteration):
        cpu, flags = platform.processor() or "?", []
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    what = f"{os.cpu_count()} CPUs ({cpu}{', ' + ' '.join(bf16) if bf16 else ''})"
    if device == "cuda":
        what = f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()}), {what}"
    return f"{what}, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------ models, inputs

def make_models(out: str, names: list[str], unet: str | None = None) -> dict[str, str]:
    """The model spec (a name or a path, as a user passes --model) of each benchmarked model; random weights are
    seeded, saved under OUT/models and loaded back from there. ``unet``: a trained U-Net artifact instead of
    random weights (its config.json records its bf16 Dice cost, which --amp auto reads; a random one records none,
    so auto keeps it in fp32)."""
    import torch

    from imgxlate.artifact import save
    from imgxlate.infer.contract import for_task
    from imgxlate.models import build

    torch.manual_seed(0)
    folder, specs = os.path.join(out, "models"), {}
    note = {"note": "random weights, for speed measurements only"}
    for name in names:
        if name == "sr-x2":
            specs[name] = "sr-x2"
        elif name == "edsr-baseline":
            specs[name] = os.path.join(folder, "edsr-baseline-x2")
            save(build("sr", preset="edsr-baseline", scale=2), specs[name], provenance=note)
        elif name == "compact-x4":
            specs[name] = compact_pth(os.path.join(folder, "compact-x4.pth"))
        elif name == "unet" and unet:
            specs[name] = unet
        elif name == "unet":                 # the Carvana U-Net's contract: squashed to 256 px, logits back
            specs[name] = os.path.join(folder, "unet-resnet34")
            save(build("unet"), specs[name], provenance=note,
                 contract=for_task("seg", size=256, source_size=(1280, 1918)))
        else:
            raise SystemExit(f"unknown model {name!r}: use {', '.join(MODELS)}")
    return specs


def compact_pth(path: str) -> str:
    """Real-ESRGAN's SRVGGNetCompact (64 features, 16 convs, x4) as a plain state_dict .pth, the key layout
    spandrel detects (body.0.weight, body.1.weight, ...); checked as `imgxlate info FILE` reads it."""
    from spandrel.architectures.Compact import Compact

    from imgxlate.external import save_state_dict
    from imgxlate.infer.predictor import model_meta

    save_state_dict(Compact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4).state_dict(), path)
    meta = model_meta(path)
    if (meta.get("arch"), meta.get("scale")) != ("spandrel:Compact", 4):
        raise RuntimeError(f"{path}: spandrel read it as {meta.get('arch')} x{meta.get('scale')}")
    return path


def make_inputs(folder: str, n: int, size: tuple[int, int]) -> list[str]:
    """n RGB PNGs of ``size`` resampled from scikit-image's sample photos (flipped after the first seven)."""
    from PIL import Image

    from imgxlate.samples import write_sample_photos

    paths = [os.path.join(folder, f"img_{i:04d}.png") for i in range(n)]
    if all(os.path.exists(p) for p in paths):
        return paths
    photos = write_sample_photos(os.path.join(os.path.dirname(os.path.dirname(folder)), "sample_photos"))
    os.makedirs(folder, exist_ok=True)
    for i, p in enumerate(paths):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            if i >= len(photos):
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT if i % 2 else Image.Transpose.FLIP_TOP_BOTTOM)
            im.save(p, "PNG")
    return paths


# ------------------------------------------------------------------------------------------------- GPU sampling

class GpuBusy:
    """utilization.gpu of every GPU (their mean), sampled every 0.2 s in a thread: NVML through pynvml when it is
    installed, else nvidia-smi. ``mean(t0, t1)`` is the busy fraction of the samples taken between two times."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._read = lambda: [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            self.source = "NVML"
        except Exception:
            self._read = self._smi
            self.source = "nvidia-smi"

    @staticmethod
    def _smi() -> list[float]:
        r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=5)
        return [float(x) for x in r.stdout.split()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.time()
            try:
                values = self._read()
                if values:
                    self.samples.append(((t0 + time.time()) / 2, sum(values) / len(values)))
            except Exception:
                pass
            self._stop.wait(max(0.0, 0.2 - (time.time() - t0)))

    def start(self) -> GpuBusy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def mean(self, t0: float, t1: float) -> float | None:
        got = [u for t, u in self.samples if t0 <= t <= t1]
        return round(sum(got) / len(got) / 100, 3) if got else None


# ------------------------------------------------------------------------------------------------------ the arms

def precision_of(pred) -> tuple[str, str]:
    """(precision, why) the Predictor runs with (imgxlate.infer.precision)."""
    return pred.precision, pred.precision_reason


def predictor(spec: str, amp: str, threads: int, compile_: bool, device: str | None = None):
    import torch

    from imgxlate.infer.predictor import PredictOptions, Predictor

    torch.set_num_threads(threads)
    return Predictor(spec, device=device, options=PredictOptions(amp=amp, **({"compile": True} if compile_ else {})))


def model_only(pred, arrays: list, batch: int, compile_: bool, busy: GpuBusy | None) -> dict:
    """The model-only bound: Predictor.run over decoded arrays in calls of ``batch`` images (the job's model
    stage does the same), after one untimed call (the first chunk on GPU or with compile, else one tile's crop:
    the tile's shapes, at a tile's cost)."""
    import torch

    gpu = str(pred.device).startswith("cuda")
    tile = pred.options.tile
    pred.run(arrays[:batch] if gpu or compile_ else [(arrays[0][0][:tile, :tile], None)])
    t0 = time.time()
    for i in range(0, len(arrays), batch):
        out = pred.run(arrays[i:i + batch])
        if bad := next((o for o in out if isinstance(o, Exception)), None):
            raise RuntimeError(f"the model failed: {bad}") from bad
    t1 = time.time()
    if gpu:
        torch.cuda.empty_cache()
    mp = sum(a.shape[0] * a.shape[1] for a, _ in arrays) / 1e6
    return {"model_only_img_s": round(len(arrays) / (t1 - t0), 3), "model_only_mp_s": round(mp / (t1 - t0), 3),
            "model_only_s": round(t1 - t0, 3), "model_only_gpu_busy": busy.mean(t0, t1) if busy else None}


def job(spec: str, src: str, dst: str, amp: str, ray_address: str, compile_: bool, busy: GpuBusy | None
        ) -> tuple[dict, dict]:
    """The batch job over SRC (every input size) in its own driver process, joined to the running Ray, its outputs
    removed once measured. Returns (what the job reports, {(width, height): that size's rates}); see size_rates."""
    import pyarrow.compute as pc

    from imgxlate.io import manifest

    kw = {"src": src, "dst": dst, "model": spec, "amp": amp, "ray_address": ray_address, "progress_every_s": 60,
          **({"compile": True} if compile_ else {})}
    s = _driver(kw)
    rows = manifest.read_run(dst, s["run_id"])
    shutil.rmtree(dst, ignore_errors=True)
    ok = rows.filter(pc.equal(rows.column("status"), "ok")).to_pylist()
    if not ok:
        raise RuntimeError(f"the job wrote no output: {s.get('counts')}")
    precision = s.get("precision")
    if "precision" in rows.column_names:        # a manifest that records each row's precision
        precision = ",".join(sorted({p for p in rows.column("precision").to_pylist() if p})) or precision
    started = dt.datetime.fromisoformat(s["started_at"]).timestamp()
    first = min(r["finished_at"] for r in ok).timestamp()
    whole = {"job_wall_s": s["wall_s"], "job_wall_img_s": round(len(ok) / s["wall_s"], 3), "job_failed": s["failed"],
             "job_first_output_s": round(first - started, 2), "job_precision": precision,
             "job_resources": s.get("resources")}
    return whole, size_rates(ok, busy)


def size_rates(ok: list[dict], busy: GpuBusy | None) -> dict:
    """Per input size, the job's steady rate from its manifest rows: the size's images over the longest time one
    model actor took from its first read to its last write of them (so neither the actors' start nor one waiting
    for another is counted), and the GPU's busy fraction from the first such read to the last such write."""
    by_size: dict[tuple[int, int], list[dict]] = {}
    for r in ok:
        by_size.setdefault((r["source_width"], r["source_height"]), []).append(r)
    rates = {}
    for size, rows in by_size.items():
        spans: dict[str | None, list[float]] = {}
        for r in rows:
            t0, t1 = r["started_at"].timestamp(), r["finished_at"].timestamp()
            span = spans.setdefault(r["worker_id"], [t0, t1])
            span[0], span[1] = min(span[0], t0), max(span[1], t1)
        longest = max(max(t1 - t0 for t0, t1 in spans.values()), 1e-3)
        t0, t1 = min(v[0] for v in spans.values()), max(v[1] for v in spans.values())
        rates[size] = {"job_ok": len(rows), "job_img_s": round(len(rows) / longest, 3), "job_actors_used": len(spans),
                       "job_model_phase_s": round(t1 - t0, 3), "gpu_busy": busy.mean(t0, t1) if busy else None}
    return rates


# ------------------------------------------------------------------------------------------------------ the run

def sizes(args, device: str) -> list[dict]:
    small, n_small, hd, n_hd = PROFILES[(device, args.quick)]
    hd = tuple(int(v) for v in args.hd.split("x")) if args.hd else hd
    note = "" if hd == (1920, 1080) else " (HD, cut for CPU)"
    return [{"label": f"{small}x{small}", "size": (small, small), "n": args.n_small or n_small, "note": ""},
            {"label": f"{hd[0]}x{hd[1]}", "size": hd, "n": args.n_hd or n_hd, "note": note}]


def bounds(args, specs: dict, device: str, busy: GpuBusy | None) -> tuple[list[dict], str]:
    """Every model-only row (no Ray running), size by size, and the folder of inputs the jobs read (one subfolder
    per size). An amp whose precision an earlier amp of the same model ran at is copied from it (``same_as``)
    unless --no-reuse."""
    from imgxlate.io import codec

    rows, wanted = [], sizes(args, device)
    src = os.path.join(args.out, "inputs", "_".join(f"{sz['label']}x{sz['n']}" for sz in wanted))
    for k, sz in enumerate(wanted):
        paths = make_inputs(os.path.join(src, f"{k}-{sz['label']}"), sz["n"], sz["size"])
        arrays = [(d.pixels, d.alpha) for d in (codec.decode(open(p, "rb").read()) for p in paths)]
        for name, spec in specs.items():
            seen: dict[str, dict] = {}
            for amp in args.amps:
                pred = predictor(spec, amp, args.threads, args.compile)
                precision, why = precision_of(pred)
                row = {"model": name, "spec": spec, "input": sz["label"], "size": list(sz["size"]), "n": sz["n"],
                       "note": sz["note"], "amp": amp, "precision": precision, "precision_reason": why}
                if precision in seen and not args.no_reuse:
                    row.update({k: v for k, v in seen[precision].items() if k.startswith("model_only")},
                               same_as=seen[precision]["amp"])
                else:
                    row.update(model_only(pred, arrays, args.batch, args.compile, busy))
                    seen[precision] = row
                del pred
                gc.collect()
                rows.append(row)
                say(f"model-only {name} {sz['label']} x{sz['n']} amp={amp} -> {precision}: "
                    f"{row['model_only_img_s']} img/s, {row['model_only_mp_s']} MP/s"
                    + (f" (same as amp={row['same_as']})" if row.get("same_as") else ""))
    return rows, src


def jobs(args, rows: list[dict], src: str, busy: GpuBusy | None) -> float:
    """One job per model and amp over every size, on one local Ray started here (returns its start-up time, which
    no rate includes); an amp whose model-only rows are all copies takes its job's rows from the amp it copies."""
    import ray

    from imgxlate import rayenv

    t0 = time.time()
    rayenv.start_or_join("local")
    ray_start_s = round(time.time() - t0, 2)
    say(f"local Ray started in {ray_start_s} s (once; not in any job rate)")
    address = ray.get_runtime_context().gcs_address
    arms = list(dict.fromkeys((r["model"], r["amp"]) for r in rows))
    try:
        for model, amp in arms:
            mine = [r for r in rows if (r["model"], r["amp"]) == (model, amp)]
            if all(r.get("same_as") for r in mine):
                for r in mine:
                    same = next(x for x in rows if (x["model"], x["input"], x["amp"]) == (model, r["input"],
                                                                                          r["same_as"]))
                    r.update({k: v for k, v in same.items() if k.startswith(("job_", "gpu_busy"))})
                continue
            dst = os.path.join(args.out, "jobs", f"{model}_{amp}")
            shutil.rmtree(dst, ignore_errors=True)
            whole, per_size = job(mine[0]["spec"], src, dst, amp, address, args.compile, busy)
            for r in mine:
                r.update(whole, **per_size.get(tuple(r["size"]), {"job_ok": 0, "job_img_s": 0.0}))
                r["job_vs_model_only"] = round(r["job_img_s"] / r["model_only_img_s"], 3)
                say(f"job {model} {r['input']} x{r['n']} amp={amp}: {r['job_img_s']} img/s, "
                    f"{r['job_vs_model_only']} of model-only (the job's wall time: {whole['job_wall_s']} s)")
    finally:
        ray.shutdown()
    return ray_start_s


def vs_off(rows: list[dict]) -> None:
    """Each row's model-only rate against the same model and input at amp=off (fp32)."""
    for row in rows:
        off = next((r for r in rows if (r["model"], r["input"], r["amp"]) == (row["model"], row["input"], "off")),
                   None)
        row["model_only_vs_off"] = round(row["model_only_img_s"] / off["model_only_img_s"], 3) if off else None


def render(result: dict) -> str:
    rows, first = result["rows"], result["rows"][0]
    res = first.get("job_resources") or {}
    job = (f" Job: {res.get('pipeline')} pipeline, {res.get('actors')} model actor(s) x "
           f"{res.get('threads_per_actor')} thread(s), {res.get('gpus_per_actor') or 0} GPU each; local Ray "
           f"started once in {result['ray_start_s']} s, not in the rates; job img/s from its manifest (first "
           f"read to last write)." if res else " No job (--model-only).")
    lines = [f"Machine: {result['machine']}." + (" torch.compile in both." if result["compile"] else ""),
             f"Model-only: one process, torch at {result['threads']} thread(s), Predictor.run in calls of "
             f"{result['batch']} images.{job} MP/s: input megapixels.", "",
             "| model | input | amp | precision | model-only img/s | model-only MP/s | vs off | job img/s "
             "| job / model-only | GPU busy (job) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        precision = r["precision"] + (f" (job: {r['job_precision']})" if r.get("job_precision") not in
                                      (None, r["precision"]) else "")
        busy = "" if r.get("gpu_busy") is None else f"{100 * r['gpu_busy']:.0f}%"
        lines.append(f"| {r['model']} | {r['n']} x {r['input']}{r['note']} | {r['amp']} | {precision} | "
                     f"{r['model_only_img_s']:.3g} | {r['model_only_mp_s']:.3g} | {r['model_only_vs_off'] or ''} | "
                     + (f"{r['job_img_s']:.3g} | {r['job_vs_model_only']:.2f} | {busy} |" if "job_img_s" in r
                        else "(no job) | | |"))
    notes = sorted({f"{r['model']} amp={r['amp']}: {r['precision_reason']}" for r in rows if r["precision_reason"]})
    same = sorted({f"{r['model']} amp={r['amp']} = amp={r['same_as']}" for r in rows if r.get("same_as")})
    if same:
        notes.append("same precision, measured once: " + "; ".join(same))
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench_device")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: fewer and smaller images")
    ap.add_argument("--amps", default="off,auto,bf16", help=f"comma-separated, of {', '.join(AMPS)}")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    ap.add_argument("--n-small", type=int, help="256 px images (default: 2 on CPU, 256 on GPU)")
    ap.add_argument("--n-hd", type=int, help="HD images (default: 2 on CPU, 24 on GPU)")
    ap.add_argument("--hd", help="HD input size WxH (default: 1920x1080 on GPU, 640x360 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile in both (PredictOptions.compile)")
    ap.add_argument("--model-only", action="store_true", help="the model-only bound alone, no job (e.g. to compare "
                    "--compile with eager: each job actor would compile again)")
    ap.add_argument("--unet", help="a trained U-Net artifact to use instead of random weights (imgxlate train seg)")
    ap.add_argument("--no-reuse", action="store_true", help="measure an amp even when an earlier one of the same "
                    "model ran at the same precision")
    args = ap.parse_args(argv)
    args.amps = [a for a in args.amps.split(",") if a]
    if bad := [a for a in args.amps if a not in AMPS]:
        ap.error(f"unknown --amps {bad}: use {', '.join(AMPS)}")
    args.out = os.path.abspath(args.out)
    t_start = time.time()
    import torch

    from imgxlate.infer.config import TranslateConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.threads = TranslateConfig.threads_per_actor or max(1, int(TranslateConfig.cpus_per_actor))  # the job's
    args.batch = TranslateConfig.batch_size
    say(f"{machine(device)}; models {args.models}; amps {','.join(args.amps)}")
    specs = make_models(args.out, [m for m in args.models.split(",") if m], args.unet)
    busy = GpuBusy().start() if device == "cuda" else None
    try:
        rows, src = bounds(args, specs, device, busy)
        ray_start_s = None if args.model_only else jobs(args, rows, src, busy)
    finally:
        if busy:
            busy.stop()
    vs_off(rows)
    result = {"machine": machine(device), "device": device, "quick": args.quick, "threads": args.threads,
              "batch": args.batch, "compile": args.compile, "ray_start_s": ray_start_s,
              "gpu_busy_source": busy.source if busy else None, "rows": rows,
              "wall_s": round(time.time() - t_start, 1),
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")}
    table = render(result)
    result["table"] = table
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print("\n" + table)
    say(f"{os.path.join(args.out, 'results.json')}; {result['wall_s']} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
