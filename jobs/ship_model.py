r"""Ship a trained artifact inside the package: score it on Set5 / Set14 under the standard protocol (with
and without self-ensemble, on degraded inputs for a restoration model), record the scores, the training
command, the data and its terms in its config.json, and copy it to imgxlate/zoo/NAME, where every
`--model` option finds it by name. See jobs/README.md (model log) for each shipped model.

Locally (the SR evaluation sets are in ../shared/data, see its README):

    python jobs/ship_model.py sr-x2 --artifact runs/sr-x2/model --eval ../shared/data/sr_eval \
        --command "imgxlate train sr ..." --data "T91 + BSD200 (../shared/data/sr_train)" --terms "..."

It also measures what bf16 costs the model against fp32 on Set5 and Set14 (PSNR, CPU autocast) and records it as
``precision_cost`` in config.json: ``--amp auto`` runs the model in bf16 only where that cost is within 0.02 dB
(imgxlate.infer.precision). To measure and record it again for a model already shipped, or for any local SR
artifact (an older one records none, so auto keeps it in fp32); the weights are untouched:

    python jobs/ship_model.py sr-x2 --precision-only --eval ../shared/data/sr_eval
    python jobs/ship_model.py mine --precision-only --artifact runs/mine/model --eval ../shared/data/sr_eval

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
    """Set5 / Set14 means in fp32, with and without self-ensemble."""
    out = {}
    for ds in ("Set5", "Set14"):
        images = read_named(os.path.join(eval_dir, ds))
        for ensemble in (False, True):
            predictor = Predictor(artifact, options=PredictOptions(ensemble=ensemble, amp="off"))
            rows = eval_sr(predictor, images, predictor.scale, degradations=degradations)
            m = mean_of(rows, ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"))
            out[ds + ("+ensemble" if ensemble else "")] = {k: round(v, 4) for k, v in m.items()}
            print(f"[ship] {ds}{' +ensemble' if ensemble else ''}: {m['psnr']:.3f} / {m['ssim']:.4f} "
                  f"(bicubic {m['psnr_bicubic']:.3f} / {m['ssim_bicubic']:.4f})", flush=True)
    return out


def precision_cost(artifact: str, eval_dir: str, degradations: str) -> dict:
    """What bf16 costs against fp32 (mean PSNR, fp32 minus bf16) on Set5 and Set14; ``psnr_db`` is the larger."""
    cost = {}
    for ds in ("Set5", "Set14"):
        images = read_named(os.path.join(eval_dir, ds))
        psnr = {}
        for amp in ("off", "bf16"):
            predictor = Predictor(artifact, device="cpu", options=PredictOptions(amp=amp))
            psnr[amp] = mean_of(eval_sr(predictor, images, predictor.scale, degradations=degradations), ("psnr",))
        cost[f"{ds.lower()}_psnr_db"] = round(psnr["off"]["psnr"] - psnr["bf16"]["psnr"], 5)
        print(f"[ship] {ds}: fp32 {psnr['off']['psnr']:.4f} dB, bf16 {psnr['bf16']['psnr']:.4f} dB "
              f"(cost {cost[f'{ds.lower()}_psnr_db']:+.4f})", flush=True)
    degraded = f", LR degraded by '{degradations}'" if degradations != "none" else ""
    return {"bf16": {"psnr_db": max(cost.values()), **cost,
                     "on": f"Set5 + Set14 (Y, shave = scale{degraded}): fp32 minus bf16, CPU autocast"}}


def record_precision(folder: str, eval_dir: str, degradations: str | None) -> int:
    """--precision-only: measure an artifact's bf16 cost (a shipped model's, or any local SR artifact's) and
    rewrite its config.json with it (weights untouched, so its model id and checksum stay)."""
    meta = read_meta(folder)
    if meta.get("task") != "sr":
        raise SystemExit(f"{folder}: a {meta.get('task')} model; this measures SR models on Set5 / Set14 (a "
                         f"segmentation or style run records its cost when it exports its artifact)")
    degradations = degradations or meta.get("shipped", {}).get("degradations", "none")
    meta["precision_cost"] = precision_cost(folder, eval_dir, degradations)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"[ship] {folder}: precision_cost {meta['precision_cost']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--artifact")
    ap.add_argument("--eval", required=True, help="folder with Set5/ and Set14/")
    ap.add_argument("--precision-only", action="store_true",
                    help="only measure and record the shipped model NAME's bf16 cost (precision_cost)")
    ap.add_argument("--degradations", default="none", help="score on LR degraded by this preset (restoration)")
    ap.add_argument("--command", help="the training command, as run")
    ap.add_argument("--data", help="the training data")
    ap.add_argument("--terms", help="the training data's terms")
    ap.add_argument("--summary", help="one line for `imgxlate models`")
    args = ap.parse_args(argv)
    if args.precision_only:                     # NAME: a shipped model; or --artifact: any local SR artifact
        return record_precision(args.artifact or os.path.join(HERE, args.name), args.eval,
                                args.degradations if args.degradations != "none" else None)
    if missing := [f"--{k}" for k in ("artifact", "command", "data", "terms", "summary") if not getattr(args, k)]:
        ap.error(f"shipping a model needs {', '.join(missing)}")

    meta = read_meta(args.artifact)
    degraded = f", LR degraded by '{args.degradations}' (seed 0 per image)" if args.degradations != "none" else ""
    meta["shipped"] = {
        "name": args.name, "summary": args.summary, "command": args.command, "data": args.data,
        "terms": args.terms, "weights": "random init, trained with imgxlate only (no pretrained weights)",
        "protocol": "Y channel, shave = scale, MATLAB bicubic LR" + degraded,
        "degradations": args.degradations,
        "scores": scores(args.artifact, args.eval, args.degradations),
    }
    meta["precision_cost"] = precision_cost(args.artifact, args.eval, args.degradations)
    dst = os.path.join(HERE, args.name)
    os.makedirs(dst, exist_ok=True)
    shutil.copyfile(os.path.join(args.artifact, meta["weights_file"]), os.path.join(dst, meta["weights_file"]))
    with open(os.path.join(dst, "config.json"), "w") as f:          # written last, as artifacts are
        json.dump(meta, f, indent=2)
    print(f"[ship] {args.name}: {dst} ({os.path.getsize(os.path.join(dst, meta['weights_file'])) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
