r"""The benchmark suite in one command: runs the benchmarks, then writes OUT/results.json and the table of
jobs/RESULTS.md (only the part between its bench_suite markers; the rest of that file is written by hand).

    python jobs/bench_suite.py --data ../shared/data --out out/bench
    python jobs/bench_suite.py --data ../shared/data --out out/bench --sr-model out/models/sr-x2 --only sr-eval
    python jobs/bench_suite.py --out out/bench --only render        # re-render the table from the JSON files
    python jobs/bench_suite.py --out out/bench --only render --results /tmp/RESULTS.md   # elsewhere

Steps (each a separate process, so each gets a fresh Ray):

  translate    the batch job against the model-only bound and a naive loop (jobs/bench_translate.py)
  throughput   training samples/s, 2 workers x 1 thread against 1 worker x 2 threads (jobs/bench_train.py)
  scaling      the LR-scaling rule: 2-worker validation PSNR against 1 worker, with seed noise
  sr-eval      Set5 / Set14 x2 PSNR/SSIM (Y, standard protocol), plain and self-ensembled, of --sr-model
               (or, without it, of a model trained for --sr-minutes by `bench_train.py sr-quality`)
  seg          U-Net against the upsample head on Carvana 512 (long: run it with --only seg)
  device       each precision's model-only bound and the job's rate against it, per model (jobs/bench_device.py;
               --unet gives a trained U-Net, whose recorded bf16 Dice cost lets --amp auto choose bf16)

The table is built from every result file under --out, so steps run on different days (or by hand) show up
together, each with the machine it ran on. On a Ray cluster, submit it as a job (see jobs/README.md); the
job's jobs/RESULTS.md is in its own copy of the working directory, so copy OUT back and run --only render here:

    python jobs/submit.py --address http://HEAD:8265 -- \
        python jobs/bench_suite.py --data /data --out /tmp/bench --only throughput,sr-eval --sr-model s3://runs/x/model
    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/bench_suite.py --data /data --out /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_STEPS = ("translate", "throughput", "scaling", "sr-eval", "device")
SRCNN = {"Set5": 36.66, "Set14": 32.42}
BEGIN, END = "<!-- bench_suite: begin -->", "<!-- bench_suite: end -->"


def machine() -> str:
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({cpu}), {gpu}, torch {torch.__version__}, {platform.system()}"


def run(cmd: list[str]) -> None:
    print("[bench] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def stamp(path: str) -> None:
    """Add when and where to a result file written by a benchmark script."""
    with open(path) as f:
        result = json.load(f)
    result.setdefault("machine_detail", machine())
    result.setdefault("finished_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"))
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def sr_eval(model: str, sr_eval_dir: str, out: str) -> dict:
    from imgxlate.evaluate import eval_sr, mean_of, read_named
    from imgxlate.infer.predictor import PredictOptions, Predictor

    m = Predictor(model, 2).model
    result = {"model": model, "model_id": m.meta["model_id"], "protocol": "Y, shave=scale, MATLAB bicubic LR",
              "trained": m.meta.get("provenance", {}).get("note") or
              f"{m.meta.get('provenance', {}).get('steps')} steps on {m.meta.get('provenance', {}).get('data')}"}
    for ds in ("Set5", "Set14"):
        for ensemble in (False, True):
            predictor = Predictor(m, options=PredictOptions(ensemble=ensemble, amp="off"))
            rows = eval_sr(predictor, read_named(os.path.join(sr_eval_dir, ds)), 2)
            mean = mean_of(rows, ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"))
            result[f"{ds}{'+' if ensemble else ''}"] = {k: round(v, 4) for k, v in mean.items()}
            print(f"[bench] {ds}{' self-ensemble' if ensemble else ''}: {mean['psnr']:.2f} dB", flush=True)
    result["machine"] = machine()
    result["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")
    with open(os.path.join(out, "sr_eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def render(out: str) -> str:
    """The Markdown table from the result files under ``out``."""
    rows, machines, dates = [], set(), set()

    def add(name, measured, target, met, source):
        rows.append((name, measured, target, "yes" if met else ("**no**" if met is not None else "")))
        machines.add(source.get("machine_detail") or source.get("machine") or "?")
        if source.get("finished_at"):
            dates.add(source["finished_at"][:10])

    t = _load(os.path.join(out, "translate", "results.json"))
    if t:
        for size in ("small", "large"):
            r = t[size]
            if r.get("model_only_machine_img_s"):
                # The job uses every CPU (in-process threads or an actor per CPU), so its bound is the model
                # alone on every CPU; one actor's bound (one process at --threads) is shown beside it.
                add(f"batch job / model-only bound on every CPU, {r['n']} x {r['size']}",
                    f"{r['job_vs_machine']:.2f} ({r['job_img_s']} vs {max(r['model_only_machine_img_s'].values())}"
                    f" img/s)", ">= 0.9", r["job_vs_machine"] >= 0.9, t)
                add(f"batch job / one model process's bound, {r['n']} x {r['size']}",
                    f"{r['job_vs_model_only']:.2f} (vs {r['model_only_img_s']} img/s)", "", None, t)
            else:                                               # results from before the whole-machine bound
                add(f"batch job / model-only bound, {r['n']} x {r['size']}",
                    f"{r['job_vs_model_only']:.2f} ({r['job_img_s']} vs {r['model_only_img_s']} img/s)", ">= 0.9",
                    r["job_vs_model_only"] >= 0.9, t)
            add(f"batch job / naive loop, {r['n']} x {r['size']}",
                f"{r['job_vs_naive']:.2f} (naive {r['naive_img_s']} img/s)", ">= 1.0", r["job_vs_naive"] >= 1.0, t)
        naive = t["naive_6000x4000"]
        if "out of memory" in naive:
            naive = "out of memory" + naive[naive.rindex(" ("):]     # keep the limit, drop the traceback text
        add("6000x4000 input, tiled: peak RSS", f"{t['tiled_6000x4000_peak_rss_mb']} MB; naive untiled loop: "
            f"{naive}", "bounded by the tile", None, t)
    tp = _load(os.path.join(out, "train", "throughput.json"))
    if tp:
        keys = [k for k in tp if "x" in k and k[0].isdigit()]
        add("training throughput, 2 workers x 1 thread / 1 worker x 2 threads",
            f"{tp['ratio_2workers_vs_1']:.2f} (" + ", ".join(f"{k}: {tp[k]:.1f}" for k in keys) + " samples/s)",
            ">= 0.85", tp["ratio_2workers_vs_1"] >= 0.85, tp)
    for path in sorted(glob.glob(os.path.join(out, "train", "scaling*.json")), key=os.path.getmtime):
        sc = _load(path)
        add(f"LR scaling rule: Set5 PSNR, 2 workers (batch {2 * sc['per_worker_batch']}, LR x2) - 1 worker, "
            f"{sc['samples']} samples each",
            f"{sc['diff_2w_minus_1w_db']:+.3f} dB ({sc['2w_seed0']['val_psnr']} vs {sc['1w_seed0']['val_psnr']}; "
            f"1-worker seed spread {sc['seed_spread_db']:.3f} dB)", "reaches 1 worker within noise",
            sc["reaches_1w_within_noise"], sc)
    q = _load(os.path.join(out, "sr_eval.json"))
    if q:
        for ds in ("Set5", "Set14"):
            r, e = q[ds], q.get(f"{ds}+")
            add(f"SR x2 {ds} PSNR / SSIM (Y), `{q['model_id']}`",
                f"{r['psnr']:.2f} / {r['ssim']:.4f}" + (f"; self-ensemble {e['psnr']:.2f} / {e['ssim']:.4f}"
                                                       if e else "") +
                f"; bicubic {r['psnr_bicubic']:.2f}", f"> SRCNN {SRCNN[ds]}", r["psnr"] > SRCNN[ds], q)
    sg = _load(os.path.join(out, "train", "seg.json"))
    if sg:
        add(f"segmentation Dice on held-out cars, stages {sg.get('stages')}",
            f"U-Net {sg['unet']['val_dice']:.4f} ({sg['unet']['wall_min']} min), upsample head "
            f"{sg['upsample_head']['val_dice']:.4f} ({sg['upsample_head']['wall_min']} min)",
            "U-Net > upsample head", sg["unet"]["val_dice"] > sg["upsample_head"]["val_dice"], sg)
    dv = _load(os.path.join(out, "device", "results.json"))
    for r in (dv or {}).get("rows", []):
        device_rows(r, dv, add)
    lines = ["| benchmark | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "Machine: " + "; ".join(sorted(machines)) if machines else "No results yet."]
    if dates:
        lines += ["", "Measured: " + ", ".join(sorted(dates))]
    return "\n".join(lines) + "\n"


def device_rows(r: dict, dv: dict, add) -> None:
    """bench_device's targets: --amp auto at least 1.8x fp32 for sr-x2 and the U-Net at 256 px on a CPU with native
    bf16; the job at least 0.9 of its model-only bound; on a GPU, busy at least 85% of the job's model phase."""
    where = f"{r['model']}, {r['n']} x {r['input']}{r['note']}, --amp {r['amp']} ({r['precision']})"
    if r["amp"] == "auto" and r["model"] in ("sr-x2", "unet") and r["input"].startswith("256") and \
            r.get("model_only_vs_off"):
        add(f"model-only bound, {where} / fp32", f"{r['model_only_vs_off']:.2f}x ({r['model_only_img_s']:.3g} img/s)",
            ">= 1.8", r["model_only_vs_off"] >= 1.8, dv)
    if r.get("job_vs_model_only") is not None and r["amp"] == "auto":
        add(f"batch job / model-only bound, {where}", f"{r['job_vs_model_only']:.2f} ({r['job_img_s']:.3g} vs "
            f"{r['model_only_img_s']:.3g} img/s)", ">= 0.9", r["job_vs_model_only"] >= 0.9, dv)
    if r.get("gpu_busy") is not None and r["amp"] == "auto":
        add(f"GPU busy during the job's model phase, {where}", f"{100 * r['gpu_busy']:.0f}%", ">= 85%",
            r["gpu_busy"] >= 0.85, dv)


def write_results(path: str, table: str) -> None:
    """Put ``table`` between the BEGIN and END markers of the Markdown file ``path``, keeping the rest of the file
    as it was written by hand (a file without the markers gets them, with the table, at its end)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Results\n"
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="folder with sr_train/, sr_eval/, seg/carvana512/")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--only", help="comma-separated steps to run (or 'render')")
    ap.add_argument("--sr-model", help="evaluate this x2 artifact instead of training one")
    ap.add_argument("--sr-minutes", type=float, default=60, help="training budget when --sr-model is not given")
    ap.add_argument("--n-large", type=int, default=6, help="translate: large (3000x2000) photos")
    ap.add_argument("--scaling-samples", type=int, default=40000)
    ap.add_argument("--unet", help="device: a trained U-Net artifact (default: random weights, which auto keeps fp32)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                    help="Markdown file whose bench_suite section gets the table (default: jobs/RESULTS.md)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    steps = DEFAULT_STEPS if not args.only else tuple(s.strip() for s in args.only.split(","))
    py, data = sys.executable, os.path.abspath(args.data)
    train_py = os.path.join(HERE, "bench_train.py")
    for step in steps:
        if step == "translate":
            run([py, os.path.join(HERE, "bench_translate.py"), "--out", os.path.join(out, "translate"),
                 "--n-large", str(args.n_large)])
            stamp(os.path.join(out, "translate", "results.json"))
        elif step == "throughput":
            run([py, train_py, "throughput", "--data", f"{data}/sr_train", "--out", os.path.join(out, "train")])
            stamp(os.path.join(out, "train", "throughput.json"))
        elif step == "scaling":
            run([py, train_py, "scaling", "--data", f"{data}/sr_train", "--eval", f"{data}/sr_eval",
                 "--samples", str(args.scaling_samples), "--out", os.path.join(out, "train")])
            stamp(os.path.join(out, "train", "scaling.json"))
        elif step == "sr-eval":
            model = args.sr_model
            if not model:
                run([py, train_py, "sr-quality", "--data", f"{data}/sr_train", "--eval", f"{data}/sr_eval",
                     "--minutes", str(args.sr_minutes), "--out", os.path.join(out, "train")])
                model = _load(os.path.join(out, "train", "sr-quality.json"))["model"]
            sr_eval(model, f"{data}/sr_eval", out)
        elif step == "seg":
            run([py, train_py, "seg", "--data", f"{data}/seg/carvana512", "--stages", "128:12,256:3", "--batch", "8",
                 "--out", os.path.join(out, "train")])
            stamp(os.path.join(out, "train", "seg.json"))
        elif step == "device":
            run([py, os.path.join(HERE, "bench_device.py"), "--out", os.path.join(out, "device")]
                + (["--unet", args.unet] if args.unet else []))
        elif step != "render":
            ap.error(f"unknown step {step!r}")
    table = render(out)
    write_results(args.results, table)
    results = {name: _load(os.path.join(out, p)) for name, p in (
        ("translate", "translate/results.json"), ("throughput", "train/throughput.json"),
        ("scaling", "train/scaling.json"), ("sr_eval", "sr_eval.json"), ("seg", "train/seg.json"),
        ("device", "device/results.json"))}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if v}, f, indent=2)
    print(table)
    print(f"[bench] {args.results} and {os.path.join(out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
