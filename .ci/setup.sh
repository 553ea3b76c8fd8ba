#!/usr/bin/env bash
# Creates (or reuses) .venv with torch, torchvision and adaptkit[dev,bench]; prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ADAPTKIT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  "$PY" -m pip install -q --upgrade pip >&2 || true
  # the local wheels on this machine kind; any torch>=2.1 / torchvision>=0.16 works elsewhere
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2 \
    || "$PY" -m pip install -q "torch>=2.1" "torchvision>=0.16" >&2
fi
"$PY" -m pip install -q -e ".[dev,bench]" >&2
echo "$PY"
