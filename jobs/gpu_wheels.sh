#!/usr/bin/env bash
# The Python packages a bare GPU machine lacks, as wheels in .whl/ (git-ignored), for jobs/gpu_check.sh there.
#
# The machines the project's `device` tool lends (H100 / H200, no network) hold python3 3.12 with PyTorch,
# pyarrow, fsspec, Pillow, safetensors, einops, aiohttp, grpcio, pytest and many more, but not Ray, spandrel or
# Ray's jsonschema / Ray Train's pydantic; the working tree that travels with a command is at most 64 MiB. Ray's
# wheel alone is 75 MiB, 31 of them the Java worker's jars (ray/jars), which a Python job never loads: it is
# repacked without them (and without the dashboard's JavaScript source maps), its RECORD to match, file modes
# kept so that raylet and gcs_server stay executable. boto3 is left out (imported only for s3:// paths).
#
#   bash jobs/gpu_wheels.sh              # here, with network (pip's registry); then, on the device:
#   bash jobs/gpu_check.sh               # (carry .whl)
#   PYVER=3.11 bash jobs/gpu_wheels.sh   # wheels for this machine's python, to try gpu_check.sh here on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PKGS=(ray==2.58.0 spandrel==0.4.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
      rpds-py==2026.9.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PKGS[@]}"
"$PY" - "$DEST" <<'EOF'
import glob, os, sys, zipfile

dest = sys.argv[1]
(whl,) = glob.glob(os.path.join(dest, "ray-*.whl"))
drop = lambda name: name.startswith("ray/jars/") or name.endswith(".js.map")
tmp = whl + ".tmp"
with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if drop(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not drop(line.split(b",")[0].decode()))
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)   # info keeps the file's mode (external_attr)
os.replace(tmp, whl)
EOF
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST" | wc -l) wheels in $DEST: $((total / 1048576)) MiB (the travelling tree's limit is 64 MiB)"
[ "$total" -lt $((56 * 1048576)) ] || { echo "too large to travel with the working tree" >&2; exit 1; }
