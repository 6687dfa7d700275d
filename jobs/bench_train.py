r"""Training benchmarks (scripts, not timed tests). Every number printed names its machine and protocol.

  throughput   samples/s of 1 worker x T threads against T workers x 1 thread, same global batch
  sr-quality   train SR x2 on a time budget, then Set5 / Set14 PSNR/SSIM (Y, standard protocol) next to
               bicubic and the published SRCNN / VDSR / EDSR-baseline rows
  scaling      the linear LR-scaling rule: validation PSNR of 2 workers (global batch 2B, LR x2, half the
               steps) against 1 worker (batch B) on the same number of samples, with a second 1-worker seed
               to show the run-to-run noise
  seg          U-Net against the lesson's upsample head on the same data, split and stage plan (the same
               samples for both; wall time printed): Dice on the held-out cars
  memory       peak RSS of each training worker on a generated set of 2,000 512x384 JPEGs (1.1 GB decoded),
               one short epoch (steps capped), 2 workers: what a worker holds of a set it cannot cache whole

    python jobs/bench_train.py throughput --data ../shared/data/sr_train
    python jobs/bench_train.py sr-quality --data ../shared/data/sr_train --eval ../shared/data/sr_eval --minutes 60
    python jobs/bench_train.py scaling --data ../shared/data/sr_train --eval ../shared/data/sr_eval --samples 40000
    python jobs/bench_train.py seg --data ../shared/data/seg/carvana512 --stages 128:12,256:3 --batch 8
    python jobs/bench_train.py memory --out out/bench_train --images 2000 --steps 20

On a Ray cluster, submit the same command as a job (see jobs/README.md); it joins the cluster through
RAY_ADDRESS, which Ray sets inside a job:

    python jobs/submit.py --address http://HEAD:8265 -- \
        python jobs/bench_train.py throughput --data s3://bucket/sr_train --out /tmp/bench
    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/bench_train.py throughput --data s3://bucket/sr_train --out /tmp/bench

Models start from random weights (no pretrained weights are downloaded here) unless --encoder-weights
says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PUBLISHED_X2 = {"Set5": {"bicubic": 33.66, "SRCNN": 36.66, "VDSR": 37.53, "EDSR-baseline": 37.99},
                "Set14": {"bicubic": 30.24, "SRCNN": 32.42, "VDSR": 33.03, "EDSR-baseline": 33.57}}


RAY_ADDRESS = None      # --ray-address: an existing cluster ('auto' inside `ray job submit`)


def _train(cfg):
    from imgxlate.train.run import train

    t0 = time.time()
    out = train(cfg, ray_address=RAY_ADDRESS)
    return out, time.time() - t0


def throughput(args) -> dict:
    """Same global batch and data; rate measured from the epoch times the loop reports."""
    import ray

    from imgxlate.train.loop import LoopConfig
    from imgxlate.train.tasks import RunConfig

    results = {}
    for workers, threads in ((1, args.threads), (args.threads, 1)):
        cfg = RunConfig(task="sr", data=args.data, name=f"tp-{workers}x{threads}-{int(time.time())}",
                        storage=os.path.join(args.out, "runs"), model={"nf": 32, "n_blocks": 8, "scale": 2,
                                                                        "global_residual": "bicubic"},
                        loop=LoopConfig(epochs=2, lr=1e-3, max_steps_per_epoch=args.steps),
                        batch_size=args.global_batch // workers, workers=workers, cpus_per_worker=threads,
                        hr_crop=64, samples_per_image=64, limit=args.limit)
        out, _ = _train(cfg)
        e = out["history"][-1]                       # the second epoch: warm
        results[f"{workers}x{threads}"] = args.global_batch * min(args.steps, 10**9) / e["epoch_time_s"]
        ray.shutdown()
    results["ratio_2workers_vs_1"] = results[f"{args.threads}x1"] / results[f"1x{args.threads}"]
    return results


def sr_quality(args) -> dict:
    from imgxlate.evaluate import eval_sr, read_named
    from imgxlate.infer.predictor import Predictor
    from imgxlate.train.loop import LoopConfig
    from imgxlate.train.tasks import RunConfig

    model = json.loads(args.model_config)
    budget_s = args.minutes * 60
    # Calibrate: a short run gives samples/s, which sets the number of steps that fit the budget.
    probe = RunConfig(task="sr", data=args.data, val=os.path.join(args.eval, "Set5"),
                      name=f"probe-{int(time.time())}", storage=os.path.join(args.out, "runs"), model=model,
                      loop=LoopConfig(epochs=1, lr=args.lr, max_steps_per_epoch=20), batch_size=args.batch,
                      workers=args.workers, hr_crop=args.hr_crop, samples_per_image=64)
    out, wall = _train(probe)
    rate = 20 * args.batch * args.workers / out["history"][0]["epoch_time_s"]
    overhead = wall - out["history"][0]["epoch_time_s"]
    steps = int(max(100, (budget_s - 2 * overhead) * rate / (args.batch * args.workers)))
    epochs = max(1, steps // 500)
    cfg = RunConfig(task="sr", data=args.data, val=os.path.join(args.eval, "Set5"),
                    name=f"sr-quality-{int(time.time())}", storage=os.path.join(args.out, "runs"), model=model,
                    loop=LoopConfig(epochs=epochs, lr=args.lr, max_steps_per_epoch=steps // epochs, ema=0.999),
                    batch_size=args.batch, workers=args.workers, hr_crop=args.hr_crop,
                    samples_per_image=max(1, (steps // epochs) * args.batch * args.workers // 290 + 1))
    print(f"[bench] {rate:.1f} samples/s -> {epochs} epochs x {steps // epochs} steps in {args.minutes} min",
          flush=True)
    out, wall = _train(cfg)
    m = Predictor(out["artifact"])
    table = {"train_wall_min": round(wall / 60, 1), "steps": steps, "model": out["artifact"],
             "protocol": "Y, shave=scale, MATLAB bicubic LR"}
    for ds in ("Set5", "Set14"):
        rows = eval_sr(m, read_named(os.path.join(args.eval, ds)), 2)
        table[ds] = {"model_psnr": round(sum(r.psnr for r in rows) / len(rows), 2),
                     "model_ssim": round(sum(r.ssim for r in rows) / len(rows), 4),
                     "bicubic_psnr": round(sum(r.psnr_bicubic for r in rows) / len(rows), 2),
                     "published": PUBLISHED_X2[ds]}
    table["beats_srcnn_on_set5"] = table["Set5"]["model_psnr"] > PUBLISHED_X2["Set5"]["SRCNN"]
    return table


def scaling(args) -> dict:
    """Same samples seen; the 2-worker arm takes half the steps at twice the global batch, and the loop scales
    the LR by global_batch / reference_batch (warmup: the one-cycle's first 25%)."""
    from imgxlate.train.loop import LoopConfig, scaled_lr
    from imgxlate.train.tasks import RunConfig

    model = json.loads(args.model_config)
    epochs = 4
    spi = max(1, round(args.samples / epochs / 290))          # 290 = T91 + BSD200
    results = {"samples": spi * 290 * epochs, "per_worker_batch": args.batch, "protocol": "Set5, Y, shave=scale"}
    for label, workers, threads, seed in (("1w_seed0", 1, 2, 0), ("1w_seed1", 1, 2, 1), ("2w_seed0", 2, 1, 0)):
        loop = LoopConfig(epochs=epochs, lr=args.lr)
        cfg = RunConfig(task="sr", data=args.data, val=os.path.join(args.eval, "Set5"),
                        name=f"scaling-{label}-{int(time.time())}", storage=os.path.join(args.out, "runs"),
                        model=model, loop=loop, batch_size=args.batch, workers=workers, cpus_per_worker=threads,
                        hr_crop=args.hr_crop, samples_per_image=spi, seed=seed)
        out, wall = _train(cfg)
        last = out["history"][-1]
        results[label] = {"workers": workers, "global_batch": args.batch * workers,
                          "lr": scaled_lr(loop, args.batch * workers), "steps": last.get("global_step"),
                          "val_psnr": round(last["val_psnr"], 3), "wall_min": round(wall / 60, 1)}
        print(json.dumps({label: results[label]}), flush=True)
        _shutdown()
    noise = abs(results["1w_seed0"]["val_psnr"] - results["1w_seed1"]["val_psnr"])
    diff = results["2w_seed0"]["val_psnr"] - results["1w_seed0"]["val_psnr"]
    # "Reaches" is one-sided: the 2-worker run may end above the 1-worker run, not more than the noise below it.
    results.update({"seed_spread_db": round(noise, 3), "diff_2w_minus_1w_db": round(diff, 3),
                    "reaches_1w_within_noise": diff >= -max(2 * noise, 0.05)})
    return results


def _shutdown() -> None:
    import ray

    ray.shutdown()


def seg(args) -> dict:
    from imgxlate.train.loop import LoopConfig
    from imgxlate.train.run import parse_stages
    from imgxlate.train.tasks import RunConfig

    results = {}
    for arch in ("unet", "upsample_head"):
        cfg = RunConfig(task="seg", data=args.data, arch=arch, name=f"seg-{arch}-{int(time.time())}",
                        storage=os.path.join(args.out, "runs"), model={"encoder_weights": args.encoder_weights},
                        stages=parse_stages("seg", args.stages), loop=LoopConfig(epochs=1, lr=args.lr),
                        batch_size=args.batch, workers=args.workers, limit=args.limit)
        out, wall = _train(cfg)
        last = out["history"][-1]
        results[arch] = {"val_dice": round(last["val_dice"], 4), "val_iou": round(last["val_iou"], 4),
                         "wall_min": round(wall / 60, 1), "model": out["artifact"]}
    results.update({"stages": args.stages, "per_worker_batch": args.batch, "workers": args.workers,
                    "split": "grouped by car id, 20% of cars held out", "encoder_weights": args.encoder_weights})
    return results


def _write_jpegs(folder: str, n: int, width: int, height: int, seed: int = 0) -> None:
    """n photo-like JPEGs (smooth colour fields plus grain), written once: a rerun reuses them."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    if len([f for f in os.listdir(folder) if f.endswith(".jpg")]) >= n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.Resampling.BICUBIC)
        px = np.asarray(base, np.int16) + rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"img_{i:05d}.jpg"),
                                                                    quality=90)


def _parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = _parent(pid)
    return False


class _PeakRss:
    """Peak RSS (VmHWM) of the Ray Train worker processes that this process's local Ray started (other
    Ray instances on the machine are left out), polled while a run trains: measured from outside, so it
    reads the same for any version of the training code."""

    def __init__(self, period_s: float = 0.2):
        import threading

        self.peak_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(period_s,), daemon=True)

    def _poll(self, period_s):
        while not self._stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if (b"RayTrainWorker" not in open(f"/proc/{pid}/cmdline", "rb").read()
                            or not _descends_from(int(pid), os.getpid())):
                        continue
                    hwm = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:"))
                    self.peak_mb[int(pid)] = max(self.peak_mb.get(int(pid), 0), int(hwm.split()[1]) / 1024)
                except (OSError, StopIteration):
                    pass
            self._stop.wait(period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def memory(args) -> dict:
    """A set larger than a worker should hold: 2,000 512x384 JPEGs (1.1 GB decoded). One epoch capped at
    --steps steps, SR x2 tiny model, 2 workers, a separate 4-image validation set (so validation costs the
    same in every version). Peak RSS per worker, polled from /proc, and (where the code records it) the
    workers' own ru_maxrss from the epoch's metrics."""
    import dataclasses

    from imgxlate.train.loop import LoopConfig
    from imgxlate.train.tasks import RunConfig

    root = os.path.join(args.out, "memory-set")
    _write_jpegs(os.path.join(root, "train"), args.images, 512, 384)
    _write_jpegs(os.path.join(root, "val"), 4, 512, 384, seed=1)
    kw = dict(task="sr", data=os.path.join(root, "train"), val=os.path.join(root, "val"),
              name=f"memory-{int(time.time())}", storage=os.path.join(args.out, "runs"), preset="tiny",
              loop=LoopConfig(epochs=1, lr=args.lr, max_steps_per_epoch=args.steps), batch_size=8,
              workers=args.workers, hr_crop=64, samples_per_image=1)
    has_cache = "cache_mb" in {f.name for f in dataclasses.fields(RunConfig)}
    if args.cache_mb is not None and has_cache:
        kw["cache_mb"] = args.cache_mb
    cfg = RunConfig(**kw)
    with _PeakRss() as rss:
        out, wall = _train(cfg)
    last = out["history"][-1]
    return {"images": args.images, "image_size": "512x384 JPEG q90",
            "decoded_set_mb": round(args.images * 512 * 384 * 3 / 2**20), "workers": args.workers,
            "steps": last.get("step"),
            "cache_mb": cfg.cache_mb if has_cache else "n/a (this version caches the whole set)",
            "peak_rss_mb_per_worker": [round(v) for _, v in sorted(rss.peak_mb.items())],
            "worker_peak_rss_mb (metrics)": last.get("worker_peak_rss_mb", "n/a (not recorded by this version)"),
            "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["throughput", "sr-quality", "scaling", "seg", "memory"])
    ap.add_argument("--data", help="training data (all but memory, which generates its own)")
    ap.add_argument("--eval", help="folder with Set5/ and Set14/ (sr-quality)")
    ap.add_argument("--out", default="out/bench_train")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="per worker")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hr-crop", type=int, default=64)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--samples", type=int, default=40000, help="scaling: training samples per arm")
    ap.add_argument("--images", type=int, default=2000, help="memory: generated training images")
    ap.add_argument("--cache-mb", type=int, help="memory: the workers' decoded-image cache (default: the run's)")
    ap.add_argument("--model-config", default='{"nf": 32, "n_blocks": 8, "scale": 2, "global_residual": "bicubic"}')
    ap.add_argument("--stages", default="128:2:frozen,128:2,256:2")
    ap.add_argument("--encoder-weights", default="none")
    ap.add_argument("--ray-address", help="join this Ray cluster ('auto' inside `ray job submit`) instead of "
                                          "starting a local one")
    args = ap.parse_args(argv)
    if args.what != "memory" and not args.data:
        ap.error(f"{args.what} needs --data")
    global RAY_ADDRESS
    RAY_ADDRESS = args.ray_address
    result = {"throughput": throughput, "sr-quality": sr_quality, "scaling": scaling, "seg": seg,
              "memory": memory}[args.what](args)
    result["machine"] = f"{os.cpu_count()} CPUs, no GPU" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "GPU"
    print(json.dumps(result, indent=2, default=str))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.what}.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
