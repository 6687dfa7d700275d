#!/usr/bin/env bash
# One prepared check of the GPU path (issue 23), for a GPU machine that has PyTorch but not this project's other
# packages: the machines the project's `device` tool lends (15 minutes in all; this takes at most 9.5, one
# command's limit is 10: the step limits add up to 540 s).
#
#   bash jobs/gpu_wheels.sh                    # here first: .whl/ with Ray (slimmed) and the rest, 46 MiB
#   device run, carry [".whl"]: bash jobs/gpu_check.sh      # there; results land in $OUT (8 files)
#   PYVER=3.11 DEST=/tmp/whl311 bash jobs/gpu_wheels.sh && QUICK=1 PY=.venv/bin/python WHL=/tmp/whl311 \
#     SITE=/tmp/site311 bash jobs/gpu_check.sh           # a dry run of the script itself on this CPU machine
#
# Steps, each with its own time limit, each writing its output to $OUT/STEP.txt (a step that fails or runs out of
# time does not stop the next):
#   env      torch, CUDA, the GPU's name, Ray, and that Ray is the carried one
#   pytest   tests/test_gpu.py (the Predictor on CUDA against CPU fp32 at each precision, pinned staging, OOM
#            halving, the job and eval agreeing on the GPU under every --amp) and tests/test_gpu_path.py
#   bench    jobs/bench_device.py: model-only bound and the job's rate at 256 px and 1920x1080 per precision, the
#            GPU's busy fraction during the job (results in bench.json)
#   train    a short Ray Train run on the GPU (`imgxlate train sr --gpu`, from the shipped sr-x2), held-out PSNR
# OUT, PY, SITE and WHL, when relative, are taken from the repository's root.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
SITE=$(realpath -m "${SITE:-/tmp/imgxlate-site}")
WHL=${WHL:-.whl}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export SITE
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/steps.txt"; }
step() {        # step NAME SECONDS COMMAND...: its output in $OUT/NAME.txt, its end printed
    local name=$1 limit=$2
    shift 2
    log "$name (limit ${limit} s): $*"
    timeout -k 5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    log "$name: rc=$rc$( [ $rc = 124 ] || [ $rc = 137 ] && echo ' (ran out of time)')"
    tail -n 30 "$OUT/$name.txt"
    # what a step cut short left running; not in a dry run, where it would stop every Ray on the machine
    [ -n "${QUICK:-}" ] || "$PY" -c "import ray.scripts.scripts as s; s.main()" stop --force > /dev/null 2>&1
}

log "installing $WHL into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
  >> "$OUT/steps.txt" 2>&1 || { log "pip install failed (run jobs/gpu_wheels.sh here first and carry .whl)"; exit 1; }
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"

step env 40 "$PY" -c "
import os, torch, ray, imgxlate
from imgxlate.infer import precision
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
print('ray', ray.__version__, ray.__file__)
assert os.path.realpath(ray.__file__).startswith(os.environ['SITE'] + '/'), 'Ray is not the carried one'
print('cpus', os.cpu_count(), 'imgxlate', imgxlate.__version__)"

step pytest 200 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py tests/test_gpu_path.py

if [ -n "${QUICK:-}" ]; then
  step bench 200 "$PY" jobs/bench_device.py --out "$WORK/bench" --quick --models sr-x2 --amps off,auto
else
  step bench 200 "$PY" jobs/bench_device.py --out "$WORK/bench" --models sr-x2,unet --amps off,auto --n-small 128 \
    --n-hd 16
fi
cp "$WORK/bench/results.json" "$OUT/bench.json" 2>/dev/null

step photos 20 "$PY" -m imgxlate.cli sample-photos "$WORK/photos" --max-side 256 --holdout 2
step train 80 "$PY" -m imgxlate.cli train sr "$WORK/photos/train" --init sr-x2 --scale 2 \
  $( [ -z "${QUICK:-}" ] && echo --gpu ) --workers 1 --batch-size 8 --hr-crop 64 --epochs 2 --steps-per-epoch 20 \
  --lr 2e-4 --val "$WORK/photos/heldout" --name gpu-smoke --storage "$WORK/runs"
log "done: $(ls "$OUT" | tr '\n' ' ')"
