"""CPU img/s of each shipped model at 512x512 input, model only (``Predictor.run`` on decoded arrays), at 1 and 2
torch threads, fp32 (``--amp off``) and what ``--amp auto`` picks: the speed column of jobs/README.md's shipped
models. Inputs are generated photos (speed does not depend on content); one warm-up call per setting.

    python jobs/bench_zoo.py                  # every shipped model
    python jobs/bench_zoo.py sr-x2 --images 4 --threads 1,2
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    import numpy as np
    import torch

    from imgxlate import zoo
    from imgxlate.infer.predictor import PredictOptions, Predictor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="shipped model names (default: all)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:args.size, :args.size]
    base = ((x * 3 + y * 5) % 256).astype(np.uint8)[..., None]
    imgs = [(np.clip(base + rng.integers(0, 60, (args.size, args.size, 3)), 0, 255).astype(np.uint8), None)
            for _ in range(args.images)]
    print("| model | threads | fp32 img/s | --amp auto img/s (precision) |\n|---|---|---|---|")
    for name in args.models or zoo.names():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            rates = {}
            for amp in ("off", "auto"):
                p = Predictor(name, device="cpu", options=PredictOptions(amp=amp))
                p.run(imgs[:1])
                t0 = time.perf_counter()
                p.run(imgs)
                rates[amp] = (len(imgs) / (time.perf_counter() - t0), p.precision)
            print(f"| `{name}` | {threads} | {rates['off'][0]:.2f} | {rates['auto'][0]:.2f} ({rates['auto'][1]}) |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
