# Sourced by jobs/quickstart.sh and tests/run.sh: creates .venv (Python >= 3.10) and installs
# imgxlate with its pinned dependencies. A second run reinstalls only when pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  echo "[imgxlate] creating .venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=".venv/.imgxlate-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || ! .venv/bin/python -c "import imgxlate" 2>/dev/null; then
  echo "[imgxlate] installing imgxlate and its pinned dependencies into .venv (first time: several minutes)"
  free_gb=$(df -Pk . | awk 'NR == 2 {printf "%.1f", $4 / 1048576}')
  if awk -v f="$free_gb" 'BEGIN {exit !(f < 7)}'; then   # torch's CUDA build and its nvidia-* wheels: 6.5 GB
    echo "[imgxlate] warning: $free_gb GB free in $ROOT, and .venv takes about 6.5 GB (torch's CUDA build and" \
      "its nvidia libraries): pip may stop with 'No space left on device'" >&2
  fi
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
  rm -f .venv/.imgxlate-* && touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
