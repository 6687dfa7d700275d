"""CPU img/s of each shipped model at 512x512 input, model only (``Predictor.run`` on decoded arrays), at 1 and 2
torch threads, fp32 (``--amp off``) and what ``--amp auto`` picks: the speed column of jobs/README.md's shipped
models. Inputs are generated photos (speed does not depend on content); one warm-up call per setting (a tile's
crop: ``bench_device.model_only``, the same loop as the device benchmark's bound).

    python jobs/bench_zoo.py                  # every shipped model
    python jobs/bench_zoo.py sr-x2 --images 4 --threads 1,2
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_device import model_only, predictor  # noqa: E402  (the model-only loop, shared with bench_device)


def main(argv=None) -> int:
    import numpy as np

    from imgxlate import zoo

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
            rates = {}
            for amp in ("off", "auto"):
                p = predictor(name, amp, threads, False, device="cpu")
                rates[amp] = (model_only(p, imgs, len(imgs), False, None)["model_only_img_s"], p.precision)
            print(f"| `{name}` | {threads} | {rates['off'][0]:.2f} | {rates['auto'][0]:.2f} ({rates['auto'][1]}) |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
