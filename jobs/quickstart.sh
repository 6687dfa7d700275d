#!/usr/bin/env bash
# The README's first command: sets up .venv, then runs imgxlate end to end on an embedded default
# (local folders, no cloud account, no cluster: Ray Train starts in-process). Outputs go to ./out/quickstart.
#   1. scikit-image's sample photos            -> out/quickstart/photos (5 to train on, 2 held out)
#   2. the batch job with the shipped sr-x2 model (trained on T91 + BSD200, never on these photos); a run
#      this small runs in this process, without starting Ray (the first output in a few seconds)
#                                              -> out/quickstart/upscaled (+ _manifest/ Parquet, summary.json)
#   3. its quality next to bicubic on the photos (Y-channel PSNR/SSIM, standard protocol, before/after sheet)
#   4. fine-tune sr-x2 on the 5 photos with Ray Train (2 workers, about 2 minutes; --init sr-x2), its
#      training loss and held-out PSNR per epoch in curves.png, and score it on the 2 photos it never saw
#                                       -> out/quickstart/runs/demo-sr/model (+ curves.png), eval_demo/
# Rerunning resumes: the finished training run and the done images are skipped.
source "$(dirname "$0")/env.sh"
OUT="${1:-out/quickstart}"
imgxlate sample-photos "$OUT/photos" --max-side 512 --holdout 2
imgxlate translate "$OUT/photos/train" "$OUT/upscaled" --model sr-x2
imgxlate eval sr --model sr-x2 --data "$OUT/photos" --scale 2 --out "$OUT/eval_sr-x2" --sheet 3
imgxlate train sr "$OUT/photos/train" --init sr-x2 --scale 2 --name demo-sr --storage "$OUT/runs" --workers 2 \
  --epochs 8 --batch-size 8 --hr-crop 96 --samples-per-image 32 --lr 2e-4 --ema 0.99 --val "$OUT/photos/heldout"
imgxlate eval sr --model "$OUT/runs/demo-sr/model" --data "$OUT/photos/heldout" --scale 2 --out "$OUT/eval_demo"
echo "[imgxlate] done: upscaled photos $OUT/upscaled (manifest in $OUT/upscaled/_manifest), sr-x2 evaluation"
echo "[imgxlate]       $OUT/eval_sr-x2 (CSV + before/after sheet); demo model $OUT/runs/demo-sr/model, curves"
echo "[imgxlate]       $OUT/runs/demo-sr/imgxlate/curves.png, its evaluation on held-out photos $OUT/eval_demo"
