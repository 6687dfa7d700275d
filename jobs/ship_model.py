r"""Ship a trained artifact inside the package: score it on Set5 / Set14 under the standard protocol (with
and without self-ensemble, on degraded inputs for a restoration model), record the scores, the training
command, the data and its terms in its config.json, and copy it to imgxlate/zoo/NAME, where every
`--model` option finds it by name. See jobs/README.md (model log) for each shipped model.

Locally (the SR evaluation sets are in ../shared/data, see its README):

    python jobs/ship_model.py sr-x2 --artifact runs/sr-x2/model --eval ../shared/data/sr_eval \
        --command "imgxlate train sr ..." --data "T91 + BSD200 (../shared/data/sr_train)" --terms "..."

On a Ray cluster it needs no workers; run it where the artifact and the evaluation sets are.
"""

import argparse
import json
import os
import shutil
import sys

from imgxlate.artifact import read_meta
from imgxlate.evaluate import eval_sr, mean_of, read_named
from imgxlate.infer.predictor import PredictOptions, Predictor
from imgxlate.zoo import HERE


def scores(artifact: str, eval_dir: str, degradations: str) -> dict:
    out = {}
    for ds in ("Set5", "Set14"):
        images = read_named(os.path.join(eval_dir, ds))
        for ensemble in (False, True):
            predictor = Predictor(artifact, options=PredictOptions(ensemble=ensemble))
            rows = eval_sr(predictor, images, predictor.scale, degradations=degradations)
            m = mean_of(rows, ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"))
            out[ds + ("+ensemble" if ensemble else "")] = {k: round(v, 4) for k, v in m.items()}
            print(f"[ship] {ds}{' +ensemble' if ensemble else ''}: {m['psnr']:.3f} / {m['ssim']:.4f} "
                  f"(bicubic {m['psnr_bicubic']:.3f} / {m['ssim_bicubic']:.4f})", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--eval", required=True, help="folder with Set5/ and Set14/")
    ap.add_argument("--degradations", default="none", help="score on LR degraded by this preset (restoration)")
    ap.add_argument("--command", required=True, help="the training command, as run")
    ap.add_argument("--data", required=True, help="the training data")
    ap.add_argument("--terms", required=True, help="the training data's terms")
    ap.add_argument("--summary", required=True, help="one line for `imgxlate models`")
    args = ap.parse_args(argv)

    meta = read_meta(args.artifact)
    degraded = f", LR degraded by '{args.degradations}' (seed 0 per image)" if args.degradations != "none" else ""
    meta["shipped"] = {
        "name": args.name, "summary": args.summary, "command": args.command, "data": args.data,
        "terms": args.terms, "weights": "random init, trained with imgxlate only (no pretrained weights)",
        "protocol": "Y channel, shave = scale, MATLAB bicubic LR" + degraded,
        "degradations": args.degradations,
        "scores": scores(args.artifact, args.eval, args.degradations),
    }
    dst = os.path.join(HERE, args.name)
    os.makedirs(dst, exist_ok=True)
    shutil.copyfile(os.path.join(args.artifact, meta["weights_file"]), os.path.join(dst, meta["weights_file"]))
    with open(os.path.join(dst, "config.json"), "w") as f:          # written last, as artifacts are
        json.dump(meta, f, indent=2)
    print(f"[ship] {args.name}: {dst} ({os.path.getsize(os.path.join(dst, meta['weights_file'])) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
