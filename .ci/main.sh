#!/usr/bin/env bash
# The main job: sets up .venv on a fresh machine, then runs the quickstart (train a small BN CNN on a
# synthetic task, evaluate source / BNAdapt / Tent on a shifted test set). Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash .ci/setup.sh)"
exec "$PY" examples/quickstart.py "$@"
