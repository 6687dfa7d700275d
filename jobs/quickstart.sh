#!/usr/bin/env bash
# The README's first command: sets up .venv, then runs imgxlate end to end on an embedded default
# (local folders, no cloud account). Outputs go to ./out/quickstart.
source "$(dirname "$0")/env.sh"
OUT="${1:-out/quickstart}"
imgxlate sample-photos "$OUT/photos" --max-side 512
imgxlate eval sr --model bicubic --data "$OUT/photos" --scale 2 --out "$OUT/eval_bicubic_x2.csv"
echo "[imgxlate] done: sample photos in $OUT/photos, per-image PSNR/SSIM in $OUT/eval_bicubic_x2.csv"
