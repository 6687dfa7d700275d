#!/usr/bin/env bash
# The test command (README, CI): sets up .venv like jobs/quickstart.sh, then runs the suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k artifact`.
source "$(dirname "$0")/../jobs/env.sh"
ruff check imgxlate tests jobs
exec python -m pytest -q -ra tests "$@"
