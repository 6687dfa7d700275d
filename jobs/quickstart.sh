#!/usr/bin/env bash
# The README's first command: sets up .venv, then runs imgxlate end to end on an embedded default
# (Ray started in-process, local folders, no cloud account). Outputs go to ./out/quickstart.
#   1. scikit-image's sample photos            -> out/quickstart/photos
#   2. train a tiny x2 SR model, 2 Ray Train workers (random init, ~1 minute)
#                                              -> out/quickstart/runs/demo-sr/model (+ curves.png)
#   3. the batch job with that model           -> out/quickstart/upscaled (+ _manifest/ Parquet, summary.json)
#   4. its quality next to bicubic (Y-channel PSNR/SSIM, standard protocol)
# Rerunning resumes: the finished training run and the done images are skipped.
source "$(dirname "$0")/env.sh"
OUT="${1:-out/quickstart}"
imgxlate sample-photos "$OUT/photos" --max-side 512
imgxlate train sr "$OUT/photos" --preset tiny --scale 2 --name demo-sr --storage "$OUT/runs" --workers 2 \
  --epochs 3 --batch-size 8 --hr-crop 64 --samples-per-image 8 --lr 1e-3
imgxlate translate "$OUT/photos" "$OUT/upscaled" --model "$OUT/runs/demo-sr/model"
imgxlate eval sr --model "$OUT/runs/demo-sr/model" --data "$OUT/photos" --scale 2 --out "$OUT/eval_x2"
echo "[imgxlate] done: model $OUT/runs/demo-sr/model, training curves $OUT/runs/demo-sr/imgxlate/curves.png,"
echo "[imgxlate]       upscaled photos $OUT/upscaled, manifest $OUT/upscaled/_manifest, evaluation $OUT/eval_x2 (CSV + before/after sheet)"
