r"""Benchmark the batch job against (a) the model-only bound and (b) a naive sequential loop.

All three run in one invocation on the same machine with the same model and torch thread count:

  model-only  the model on pre-decoded tensors in one process (tiled as the job tiles)
  naive       read, decode, model (whole image, no tiling), encode, write, one image at a time
  job         `imgxlate translate` on local Ray: read/decode and encode/write tasks around one
              model actor with the same thread count

Printed as images/s and ratios, for small (~256 px) and large (~3000 px) photos, plus the peak
memory of a 6000x4000 input with tiling (and whether the untiled naive path fits in memory).
The model has random weights (speed does not depend on them).

    python jobs/bench_translate.py --out out/bench            # scikit-image's sample photos
    python jobs/bench_translate.py --photos ../shared/data/sr_train/BSD200 --out out/bench

On a cluster's head node (the script starts its own local Ray for each arm, so it measures one machine;
submitting it runs it there with the cluster's software):

    python jobs/submit.py --address http://HEAD:8265 -- python jobs/bench_translate.py --out /tmp/bench
    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/bench_translate.py --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from PIL import Image


def make_photos(src_photos: list[str], dst: str, n: int, size: tuple[int, int]) -> list[str]:
    os.makedirs(dst, exist_ok=True)
    paths = []
    for i in range(n):
        with Image.open(src_photos[i % len(src_photos)]) as im:
            im = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            if i >= len(src_photos):
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT if i % 2 else Image.Transpose.FLIP_TOP_BOTTOM)
            p = os.path.join(dst, f"photo_{i:03d}.jpg")
            im.save(p, "JPEG", quality=90)
            paths.append(p)
    return paths


def model_only(model_uri: str, paths: list[str], threads: int, tile: int) -> float:
    import torch

    from imgxlate.infer.predictor import PredictOptions, Predictor
    from imgxlate.io import codec

    torch.set_num_threads(threads)
    pred = Predictor(model_uri, options=PredictOptions(tile=tile))
    decoded = [codec.decode(open(p, "rb").read()) for p in paths]
    pred.run([(decoded[0].pixels[:64, :64], None)])                # warm-up
    t0 = time.perf_counter()
    for d in decoded:                                            # one image at a time, like the actor's
        pred.run([(d.pixels, d.alpha)])                          # large-image path; small ones batch below
    return len(decoded) / (time.perf_counter() - t0)


def model_only_batched(model_uri: str, paths: list[str], threads: int, tile: int, batch: int) -> float:
    import torch

    from imgxlate.infer.predictor import PredictOptions, Predictor
    from imgxlate.io import codec

    torch.set_num_threads(threads)
    pred = Predictor(model_uri, options=PredictOptions(tile=tile))
    decoded = [(d.pixels, d.alpha) for d in (codec.decode(open(p, "rb").read()) for p in paths)]
    pred.run(decoded[:1])
    t0 = time.perf_counter()
    for i in range(0, len(decoded), batch):
        pred.run(decoded[i:i + batch])
    return len(decoded) / (time.perf_counter() - t0)


NAIVE = r"""
import os, sys, time, resource, torch, numpy as np
from PIL import Image
from imgxlate.artifact import load
from imgxlate.infer.predictor import to_tensor, to_uint8
limit = int(sys.argv[4])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
torch.set_num_threads(int(sys.argv[3]))
model = load(sys.argv[1])
paths = sys.argv[5:]
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
t0 = time.perf_counter()
try:
    for p in paths:
        data = open(p, "rb").read()
        img = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
        with torch.inference_mode():
            y = to_uint8(model(to_tensor(img)))
        Image.fromarray(y).save(os.path.join(out, os.path.basename(p) + ".png"))
    print("RESULT", len(paths) / (time.perf_counter() - t0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
except (MemoryError, RuntimeError) as e:
    print("OOM", type(e).__name__, str(e)[:200].replace(chr(10), " "))
"""


def naive(model_uri: str, paths: list[str], out: str, threads: int, mem_limit: int = 0) -> tuple[str, float, int]:
    r = subprocess.run([sys.executable, "-c", NAIVE, model_uri, out, str(threads), str(mem_limit), *paths],
                       capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith(("RESULT", "OOM"))), None)
    if line is None:
        return f"failed (exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] or ''})", 0.0, 0
    if line.startswith("OOM"):
        return "out of memory: " + line[4:], 0.0, 0
    _, rate, rss = line.split()
    return "ok", float(rate), int(rss)


def run_job(model_uri: str, src: str, dst: str, tile: int, batch: int) -> float:
    from imgxlate.infer import job

    s = job.run(job.TranslateConfig(src=src, dst=dst, model=model_uri, tile=tile, batch_size=batch,
                                    progress_every_s=30))
    ok = s["counts"].get("ok", 0)
    return ok / s["wall_s"]


PEAK = r"""
import sys, resource, io, numpy as np, torch
from PIL import Image
torch.set_num_threads(int(sys.argv[3]))
from imgxlate.infer.predictor import Predictor, PredictOptions
from imgxlate.io import codec
data = open(sys.argv[1], "rb").read()
d = codec.decode(data, max_pixels=10**9)
out = Predictor(sys.argv[2], options=PredictOptions(tile=int(sys.argv[4]) or None)).run([(d.pixels, None)])[0]
enc = codec.encode(out.pixels, None, "png")
print("RESULT", out.pixels.shape, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", help="folder of photos to resample (default: scikit-image's sample photos)")
    ap.add_argument("--out", default="out/bench_translate")
    ap.add_argument("--n-small", type=int, default=400)
    ap.add_argument("--n-large", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for all three (the job's actor uses 1 CPU)")
    ap.add_argument("--tile", type=int, default=None, help="default: the job's (256 on CPU)")
    ap.add_argument("--batch", type=int, default=8, help="images per model-actor call")
    ap.add_argument("--nf", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--naive-mem-limit-gb", type=float, default=16)
    args = ap.parse_args(argv)

    from imgxlate.artifact import save
    from imgxlate.evaluate import list_images
    from imgxlate.models import build
    from imgxlate.samples import write_sample_photos

    out = os.path.abspath(args.out)
    photos = ([it.source_uri for it in list_images(args.photos)] if args.photos
              else write_sample_photos(os.path.join(out, "sample_photos")))
    model_uri = os.path.join(out, "model")
    save(build("sr", nf=args.nf, n_blocks=args.blocks, scale=2), model_uri,
         provenance={"note": "random weights, for speed measurements only"})
    results = {"machine": f"{os.cpu_count()} CPUs", "threads": args.threads,
               "model": f"sr nf={args.nf} blocks={args.blocks} x2 (random weights)"}

    import ray

    for name, n, size in (("small", args.n_small, (256, 192)), ("large", args.n_large, (3000, 2000))):
        src = os.path.join(out, f"photos_{name}")
        paths = make_photos(photos, src, n, size)
        bound = (model_only_batched(model_uri, paths, args.threads, args.tile, args.batch) if name == "small"
                 else model_only(model_uri, paths, args.threads, args.tile))
        status, naive_rate, naive_rss = naive(model_uri, paths, os.path.join(out, f"naive_{name}"), args.threads,
                                              int(args.naive_mem_limit_gb * 2**30))
        t0 = time.perf_counter()                 # Ray runs only while the job does: it would compete
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        results[f"ray_start_s_{name}"] = round(time.perf_counter() - t0, 2)
        job_rate = run_job(model_uri, src, os.path.join(out, f"job_{name}_{int(time.time())}"), args.tile, args.batch)
        ray.shutdown()
        results[name] = {
            "n": n, "size": f"{size[0]}x{size[1]}", "model_only_img_s": round(bound, 3),
            "naive_img_s": round(naive_rate, 3), "naive_status": status, "naive_peak_rss_mb": naive_rss // 1024,
            "job_img_s": round(job_rate, 3), "job_vs_model_only": round(job_rate / bound, 3),
            "job_vs_naive": round(job_rate / naive_rate, 3) if naive_rate else None,
        }
        print(json.dumps({name: results[name]}), flush=True)

    big = os.path.join(out, "6000x4000.jpg")
    with Image.open(photos[0]) as im:
        im.convert("RGB").resize((6000, 4000), Image.Resampling.BILINEAR).save(big, "JPEG", quality=90)
    r = subprocess.run([sys.executable, "-c", PEAK, big, model_uri, str(args.threads), str(args.tile or 0)],
                       capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT")), "")
    results["tiled_6000x4000_peak_rss_mb"] = int(line.split()[-1]) // 1024 if line else f"failed: {r.stderr[-300:]}"
    status, _, rss = naive(model_uri, [big], os.path.join(out, "naive_big"), args.threads,
                           int(args.naive_mem_limit_gb * 2**30))
    results["naive_6000x4000"] = status + (f", peak {rss // 1024} MB" if rss else "") + \
        f" (address-space limit {args.naive_mem_limit_gb:g} GB)"
    print(json.dumps(results, indent=2))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
