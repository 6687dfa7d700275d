r"""Benchmark the batch job against (a) the model-only bound and (b) a naive sequential loop.

All run in one invocation on the same machine with the same model:

  model-only  the model on pre-decoded pixels (tiled as the job tiles), each bound in its own processes, all
              started together after a warm-up: one process at --threads (what one model actor has), and the
              whole machine (a process per worker, or one process on every thread: the better of the two)
  naive       read, decode, model (whole image, no tiling), encode, write, one image at a time
  job         `imgxlate translate` in its own process, per --pipelines arm: auto (as a user runs it: in this
              process's threads for runs this small) and fused (on Ray, 1-CPU actors)

Printed as images/s and ratios, for small (~256 px) and large (~3000 px) photos, plus the peak
memory of a 6000x4000 input with tiling (and whether the untiled naive path fits in memory).
The model has random weights (speed does not depend on them).

    python jobs/bench_translate.py --out out/bench            # scikit-image's sample photos
    python jobs/bench_translate.py --photos ../shared/data/sr_train/BSD200 --out out/bench

Scale mode: many tiny inputs (16-32 px PNGs, `--model bicubic --scale 2`) on local disk and on a loopback S3
server (moto), printing per N the planning (listing) time, wall time, images/s, the ratio to a one-process naive
loop (open, bicubic, save), when the first output was written against when the listing ended, and the driver's
peak RSS. `--plan-only N` runs the plan alone (a dry run) over N inputs, for N too large to process here.

    python jobs/bench_translate.py --mode scale --counts 10000,100000 --s3 100000 --out out/bench_scale

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
import shutil
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


BOUND = r"""
import json, sys, time, torch
from imgxlate.infer.predictor import PredictOptions, Predictor
from imgxlate.io import codec
kw = json.loads(sys.argv[1])
torch.set_num_threads(kw["threads"])
pred = Predictor(kw["model"], options=PredictOptions(tile=kw["tile"], amp=kw["amp"]))
decoded = [(d.pixels, d.alpha) for d in (codec.decode(open(p, "rb").read()) for p in kw["paths"])]
pred.run(decoded[:1])                      # warm-up: the first call of a shape builds its kernels
print("READY", flush=True)
sys.stdin.readline()                       # every process starts at once
t0 = time.time()
for i in range(0, len(decoded), kw["batch"]):
    if bad := [o for o in pred.run(decoded[i:i + kw["batch"]]) if isinstance(o, Exception)]:
        sys.exit(f"the model failed: {bad[0]!r}")
print("RESULT", t0, time.time(), flush=True)
"""


def model_only(model_uri: str, paths: list[str], threads: int, tile: int | None, batch: int, amp: str = "auto",
               procs: int = 1) -> float:
    """The model alone on pre-decoded pixels (as the job's model stage gets them, ``batch`` images a call; 1 for
    large images, which the job tiles one at a time): ``procs`` processes of ``threads`` torch threads at once,
    each over its share of ``paths``, all started together after a warm-up. Returns images/s over all of them."""
    shares = [paths[i::procs] for i in range(procs)]
    ps = [subprocess.Popen([sys.executable, "-c", BOUND, json.dumps(
        {"model": model_uri, "paths": share, "threads": threads, "tile": tile, "amp": amp, "batch": batch})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for share in shares]
    try:
        for p in ps:
            if p.stdout.readline().strip() != "READY":
                raise RuntimeError(f"the model-only bound failed to start (exit {p.wait()})")
        for p in ps:
            p.stdin.write("go\n")
            p.stdin.flush()
        spans = []
        for p in ps:
            line = p.communicate()[0].split()
            if p.returncode or line[:1] != ["RESULT"]:
                raise RuntimeError(f"the model-only bound failed (exit {p.returncode})")
            spans.append((float(line[1]), float(line[2])))
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
    return len(paths) / (max(b for _, b in spans) - min(a for a, _ in spans))


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
amp = sys.argv[5] == "bf16"             # the loop under bf16 autocast, as a user would add it
paths = sys.argv[6:]
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
t0 = time.perf_counter()
try:
    for p in paths:
        data = open(p, "rb").read()
        img = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = to_uint8(model(to_tensor(img)).float())
        Image.fromarray(y).save(os.path.join(out, os.path.basename(p) + ".png"))
    print("RESULT", len(paths) / (time.perf_counter() - t0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
except (MemoryError, RuntimeError) as e:
    print("OOM", type(e).__name__, str(e)[:200].replace(chr(10), " "))
"""


def naive(model_uri: str, paths: list[str], out: str, threads: int, mem_limit: int = 0,
          amp: str = "off") -> tuple[str, float, int]:
    r = subprocess.run([sys.executable, "-c", NAIVE, model_uri, out, str(threads), str(mem_limit), amp, *paths],
                       capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith(("RESULT", "OOM"))), None)
    if line is None:
        return f"failed (exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] or ''})", 0.0, 0
    if line.startswith("OOM"):
        return "out of memory: " + line[4:], 0.0, 0
    _, rate, rss = line.split()
    return "ok", float(rate), int(rss)


def run_job(model_uri: str, src: str, dst: str, tile: int | None, batch: int, amp: str, pipeline: str,
            png_level: int | None = None) -> dict:
    """`imgxlate translate` in its own process, as a user runs it (``auto``: in-process for a small run, Ray
    otherwise; ``fused``: on Ray whatever the size): its rate over its wall time (Ray's start included), its
    steady rate (first output to last) and its model's mean time per image (from the manifest's rows)."""
    import pyarrow.compute as pc

    from imgxlate.io import manifest

    s = _driver({"src": src, "dst": dst, "model": model_uri, "tile": tile, "batch_size": batch, "amp": amp,
                 "pipeline": pipeline, "progress_every_s": 30, "png_level": png_level})
    ok = s["counts"].get("ok", 0)
    rows = manifest.read_run(dst, s["run_id"])
    done_at = rows.column("finished_at")
    first, last = pc.min(done_at), pc.max(done_at)
    span = (last.as_py() - first.as_py()).total_seconds()
    at_first = pc.sum(pc.equal(done_at, first)).as_py()   # the first block's rows share its time
    model_s = pc.mean(rows.column("t_model_s")).as_py()
    res = s.get("resources") or {}
    return {"pipeline": res.get("pipeline"), "workers": res.get("actors"),
            "threads_per_worker": res.get("threads_per_actor"), "precision": s.get("precision"),
            "wall_s": s["wall_s"], "img_s": round(ok / s["wall_s"], 3), "first_output_s": _first_output_s(dst, s),
            "steady_img_s": round((ok - at_first) / span, 3) if span > 0 else None,
            "model_ms_per_img": round(1000 * model_s, 1) if model_s is not None else None}


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


def _tiny_pngs(args) -> None:
    root, start, stop, seed, lo, hi = args
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(start, stop):
        h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        y, x = np.mgrid[:h, :w]
        img = ((x * 7 + y * 3 + i) % 256).astype(np.uint8)[..., None] + rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        folder = os.path.join(root, f"d{i // 1000:04d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f"i{i:07d}.png"), "PNG", compress_level=1)


def make_tiny_tree(root: str, n: int, px: tuple[int, int] = (16, 32)) -> None:
    """n tiny PNGs (sides px[0]..px[1]) in folders of 1,000 (made once; a larger tree serves smaller N through
    --limit)."""
    from multiprocessing import Pool

    have = sum(len(files) for _, _, files in os.walk(root)) if os.path.isdir(root) else 0
    if have >= n:
        return
    step = 5000
    chunks = [(root, a, min(a + step, n), a, *px) for a in range(have - have % step, n, step)]
    t0 = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        for k, _ in enumerate(pool.imap_unordered(_tiny_pngs, chunks), 1):
            if k % 20 == 0:
                print(f"  made {k * step} / {n} tiny inputs ({time.perf_counter() - t0:.0f} s)", flush=True)


# The loop a user would write instead: open, bicubic x2, save, one image at a time; with a 4th argument P > 1, the
# same loop in a multiprocessing.Pool(P) over P equal slices (the real alternative on a P-CPU machine).
NAIVE_TINY = r"""
import os, sys, time, torch
from multiprocessing import Pool
import numpy as np
from PIL import Image
torch.set_num_threads(1)
root, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
procs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
def loop(paths):
    for p in paths:
        x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float()
        y = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        y = y.round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()
        Image.fromarray(y).save(os.path.join(out, os.path.basename(p)))
    return len(paths)
if __name__ == "__main__":
    paths = []
    for d, _, files in sorted(os.walk(root)):
        paths += [os.path.join(d, f) for f in sorted(files)]
        if len(paths) >= n:
            break
    paths = paths[:n]
    os.makedirs(out, exist_ok=True)
    if procs == 1:
        t0 = time.perf_counter()
        done = loop(paths)
    else:
        with Pool(procs) as pool:
            pool.map(len, [[]] * procs)              # the workers are up before the clock starts
            t0 = time.perf_counter()
            done = sum(pool.map(loop, [paths[i::procs] for i in range(procs)]))
    print("RESULT", done / (time.perf_counter() - t0))
"""


def naive_tiny(tree: str, out: str, n: int, procs: int = 1) -> float:
    """images/s of the naive loop (``procs`` > 1: in a multiprocessing.Pool) over the first n inputs of the tree."""
    script = os.path.join(out, "naive_tiny.py")          # a file, so that the pool's workers can import `loop`
    os.makedirs(out, exist_ok=True)
    with open(script, "w") as f:
        f.write(NAIVE_TINY)
    r = subprocess.run([sys.executable, script, tree, os.path.join(out, f"naive_{procs}"), str(n), str(procs)],
                       capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"the naive loop failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return float(line.split()[1])

DRIVER = r"""
import datetime as dt, json, resource, sys, threading, time
from imgxlate.infer import job
peak = {"RssAnon": 0, "RssShmem": 0}
def sample():                     # the driver's own memory, apart from object-store pages it has touched
    while True:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in peak:
                peak[k] = max(peak[k], int(v.split()[0]) // 1024)
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
kw = json.loads(sys.argv[1])
t0 = dt.datetime.now(dt.timezone.utc)
s = job.run(job.TranslateConfig(**kw))
s.pop("config", None)
s["started_at"] = t0.isoformat()
s["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
s["driver_peak_anon_mb"], s["driver_peak_shmem_mb"] = peak["RssAnon"], peak["RssShmem"]
print("RESULT " + json.dumps(s, default=str))
"""


def _driver(kw: dict, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(kw)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the job failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return json.loads(line[7:])


def _first_output_s(dst: str, summary: dict) -> float | None:
    """Seconds from the job's start to the first output it wrote (from its manifest)."""
    import datetime as dt

    import pyarrow.compute as pc

    from imgxlate.io import manifest

    table = manifest.read_run(dst, summary["run_id"])
    if not table.num_rows:
        return None
    first = pc.min(table.column("finished_at")).as_py()
    return round((first - dt.datetime.fromisoformat(summary["started_at"])).total_seconds(), 2)


def _row(label: str, n: int, s: dict, naive_rate: float, first: float | None, pool_rate: float = 0.0) -> dict:
    ok = s["counts"].get("ok", 0)
    rate = ok / s["wall_s"] if s["wall_s"] else 0
    res = s.get("resources") or {}
    if res.get("pipeline"):                     # where it ran: in-process (its threads) or on Ray (its actors)
        unit = "threads" if res["pipeline"] == "in-process" else "actors"
        label += f" ({res['pipeline']}, {res.get('actors')} {unit})"
    return {"source": label, "inputs": n, "listing_s": s.get("listing_s"), "first_output_s": first,
            "wall_s": s["wall_s"], "img_s": round(rate, 1), "naive_img_s": round(naive_rate, 1),
            "job_vs_naive": round(rate / naive_rate, 3) if naive_rate else None,
            "pool_img_s": round(pool_rate, 1) if pool_rate else None,
            "job_vs_pool": round(rate / pool_rate, 3) if pool_rate else None,
            "driver_peak_rss_mb": s["driver_peak_rss_mb"], "driver_peak_anon_mb": s["driver_peak_anon_mb"],
            "driver_peak_shmem_mb": s["driver_peak_shmem_mb"], "ok": ok, "shards": s.get("shards")}


def scale(args) -> int:
    out = os.path.abspath(args.out)
    counts = [int(c) for c in args.counts.split(",") if c]
    px = tuple(int(v) for v in (args.px.split("-") * 2)[:2])
    tree = os.path.join(out, "tiny" if px == (16, 32) else f"px{px[0]}-{px[1]}")
    biggest = max(counts + [args.s3, args.plan_only])
    print(f"making {biggest} {px[0]}-{px[1]} px inputs under {tree} ...", flush=True)
    make_tiny_tree(tree, biggest, px)
    naive_rate = naive_tiny(tree, out, args.naive_n)
    pool_rate = naive_tiny(tree, out, args.naive_n * args.pool, args.pool) if args.pool > 1 else 0.0
    print(json.dumps({"naive_loop_img_s": round(naive_rate, 1), "over": args.naive_n,
                      f"pool{args.pool}_img_s": round(pool_rate, 1)}), flush=True)
    rows = []
    base = {"model": "bicubic", "scale": 2, "progress_every_s": 60, "num_cpus": args.num_cpus,
            "pipeline": args.pipeline, "png_level": args.png_level,
            **({"queued_inputs": args.queued_inputs} if args.queued_inputs else {})}
    arms = [a for a in args.durable.split(",") if a]     # IMGXLATE_DURABLE values (imgxlate.io.storage.sync_mode)
    for n in counts:
        for arm in arms:
            dst = os.path.join(out, f"job_{n}_{arm}_{int(time.time())}")
            s = _driver({**base, "src": tree, "dst": dst, "limit": n}, {"IMGXLATE_DURABLE": arm})
            label = ("local" if arms == ["1"] else f"local, IMGXLATE_DURABLE={arm}") + \
                (f", --png-level {args.png_level}" if args.png_level is not None else "")
            rows.append(_row(label, n, s, naive_rate, _first_output_s(dst, s), pool_rate))
            if not args.keep_outputs:
                shutil.rmtree(dst, ignore_errors=True)          # a 1M run writes about 6 GB
            print(json.dumps(rows[-1]), flush=True)
    if args.plan_only:
        s = _driver({**base, "src": tree, "dst": os.path.join(out, "plan_only"), "limit": args.plan_only,
                     "dry_run": True})
        d = s["dry_run"]
        rows.append({"source": "local (plan only: dry run)", "inputs": d["inputs"], "listing_s": d["listing_s"],
                     "driver_peak_rss_mb": s["driver_peak_rss_mb"], "driver_peak_anon_mb": s["driver_peak_anon_mb"],
                     "driver_peak_shmem_mb": s["driver_peak_shmem_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    if args.s3:
        rows.append(_s3_arm(args, tree, naive_rate, base))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| source | inputs | listing s | first output s | wall s | img/s | vs naive loop | vs Pool({args.pool}) "
          "| driver peak RSS MB | of it, own (anon) / object-store pages MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['source']} | {x['inputs']:,} | {x.get('listing_s')} | {x.get('first_output_s', '')} | "
              f"{x.get('wall_s', '')} | {x.get('img_s', '')} | {x.get('job_vs_naive', '')} | "
              f"{x.get('job_vs_pool') or ''} | {x['driver_peak_rss_mb']} | {x['driver_peak_anon_mb']} / "
              f"{x['driver_peak_shmem_mb']} |")
    with open(os.path.join(out, f"scale_results_{os.path.basename(tree)}.json"), "w") as f:
        json.dump({"naive_loop_img_s": naive_rate, f"pool{args.pool}_img_s": pool_rate,
                   "machine": f"{os.cpu_count()} CPUs", "px": args.px, "rows": rows}, f, indent=2)
    return 0


def _moto_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process on 127.0.0.1 (in the benchmark's process it would share its GIL)."""
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return server, endpoint
        except urllib.error.HTTPError:           # it answers
            return server, endpoint
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"moto_server exited with {server.returncode}") from None
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto_server did not answer within 30 s")


def _s3_arm(args, tree: str, naive_rate: float, base: dict) -> dict:
    """N tiny inputs uploaded to a moto S3 server on 127.0.0.1 (its own process, stopped at the end), S3 to S3."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    server, endpoint = _moto_server()
    try:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint}
        os.environ.update(env)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        files = []
        for d, _, names in sorted(os.walk(tree)):
            files += [os.path.join(d, f) for f in sorted(names)]
            if len(files) >= args.s3:
                break
        files = files[:args.s3]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: s3.put_object(Bucket="bench", Key="in/" + os.path.relpath(p, tree),
                                                  Body=open(p, "rb").read()), files))
        print(f"  uploaded {len(files)} objects to {endpoint} in {time.perf_counter() - t0:.0f} s", flush=True)
        s = _driver({**base, "src": "s3://bench/in", "dst": "s3://bench/out", "s3_endpoint": endpoint}, env)
        return _row("loopback S3 (moto)", len(files), s, naive_rate, _first_output_s("s3://bench/out", s))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["speed", "scale"], default="speed")
    ap.add_argument("--counts", default="10000,100000", help="scale: local input counts to run")
    ap.add_argument("--s3", type=int, default=100_000, help="scale: inputs on the loopback S3 server (0: skip)")
    ap.add_argument("--plan-only", type=int, default=0, help="scale: also plan (dry run) this many inputs")
    ap.add_argument("--px", default="16-32", help="scale: the inputs' sides, MIN-MAX pixels (default 16-32)")
    ap.add_argument("--naive-n", type=int, default=3000, help="scale: images the naive loop times")
    ap.add_argument("--pool", type=int, default=2, help="scale: also time the naive loop in a multiprocessing.Pool "
                    "of this many processes, over naive-n images each (1: not)")
    ap.add_argument("--num-cpus", type=int, default=None, help="scale: logical CPUs for the job's Ray")
    ap.add_argument("--pipeline", default="auto", choices=["auto", "in-process", "fused", "split"],
                    help="scale: the job's --pipeline")
    ap.add_argument("--durable", default="1", help="scale: local arms, comma-separated IMGXLATE_DURABLE values "
                    "('1' durable writes, the default; '0' none, to measure their cost; 'fsync' one per file)")
    ap.add_argument("--queued-inputs", type=int, default=None, help="scale: the job's --queued-inputs")
    ap.add_argument("--png-level", type=int, default=None, help="the job's --png-level (default: the job's own; the "
                    "loops write PNG as Pillow does by default, level 6, as a user's loop would)")
    ap.add_argument("--keep-outputs", action="store_true", help="scale: keep each local job's outputs (removed "
                    "once measured by default)")
    ap.add_argument("--photos", help="folder of photos to resample (default: scikit-image's sample photos)")
    ap.add_argument("--out", default="out/bench_translate")
    ap.add_argument("--n-small", type=int, default=400)
    ap.add_argument("--small-size", default="256x192", help="WxH of the small photos")
    ap.add_argument("--large-size", default="3000x2000", help="WxH of the large photos")
    ap.add_argument("--n-large", type=int, default=4, help="large photos (default 4: a whole number per worker)")
    ap.add_argument("--pipelines", default="auto,fused", help="speed: the job's --pipeline per arm, comma-separated "
                    "(the first, auto by default, is the job as a user runs it: in-process for these small runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model-only bound and the naive loop "
                    "(the job's actors on Ray have 1 CPU each)")
    ap.add_argument("--tile", type=int, default=None, help="default: the job's (256 on CPU)")
    ap.add_argument("--batch", type=int, default=8, help="images per model-actor call")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                    help="precision of the bound, the job and the loop (bf16: autocast in the loop too; auto is fp32 "
                    "here: the random-weight model records no bf16 cost)")
    ap.add_argument("--nf", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--naive-mem-limit-gb", type=float, default=16)
    args = ap.parse_args(argv)
    if args.mode == "scale":
        return scale(args)

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
               "model": f"sr nf={args.nf} blocks={args.blocks} x2 (random weights)", "amp": args.amp,
               "png_level": args.png_level}

    cpus = os.cpu_count() or 1
    sizes = [tuple(int(v) for v in x.split("x")) for x in (args.small_size, args.large_size)]
    for name, n, size in (("small", args.n_small, sizes[0]), ("large", args.n_large, sizes[1])):
        if not n:                                                  # (--n-small 0: the large photos only)
            continue
        src = os.path.join(out, f"photos_{name}")
        paths = make_photos(photos, src, n, size)
        batch = args.batch if name == "small" else 1              # the job tiles a large image, one at a time
        bound = model_only(model_uri, paths, args.threads, args.tile, batch, args.amp)
        # What the model alone gets from the whole machine: a process per worker, or one on every thread.
        machine = {f"{k}x{t}": model_only(model_uri, paths, t, args.tile, batch, args.amp, procs=k)
                   for k, t in {(max(1, cpus // args.threads), args.threads), (1, cpus)}}
        best = max(machine.values())
        naive_paths = paths[:max(2, n // 4)]                       # a rate: a share of the images is enough
        status, naive_rate, naive_rss = naive(model_uri, naive_paths, os.path.join(out, f"naive_{name}"),
                                              args.threads, int(args.naive_mem_limit_gb * 2**30), args.amp)
        jobs = {}
        for pipeline in args.pipelines.split(","):
            jobs[pipeline] = j = run_job(model_uri, src, os.path.join(out, f"job_{name}_{pipeline}_{time.time_ns()}"),
                                         args.tile, args.batch, args.amp, pipeline, args.png_level)
            j.update({"vs_model_only": round(j["img_s"] / bound, 3), "vs_machine": round(j["img_s"] / best, 3),
                      "steady_vs_machine": round(j["steady_img_s"] / best, 3) if j["steady_img_s"] else None})
            print(json.dumps({name: {pipeline: j}}), flush=True)
        user = jobs[args.pipelines.split(",")[0]]                # the first: auto, as a user runs it
        results[name] = {
            "n": n, "size": f"{size[0]}x{size[1]}", "model_only_img_s": round(bound, 3),
            "model_only_machine_img_s": {k: round(v, 3) for k, v in machine.items()},
            "naive_img_s": round(naive_rate, 3), "naive_n": len(naive_paths), "naive_status": status,
            "naive_peak_rss_mb": naive_rss // 1024,
            "job_img_s": user["img_s"], "job_pipeline": user["pipeline"], "job_vs_model_only": user["vs_model_only"],
            "job_vs_machine": user["vs_machine"],
            "job_vs_naive": round(user["img_s"] / naive_rate, 3) if naive_rate else None, "jobs": jobs,
        }
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "jobs"}}), flush=True)

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
