#!/usr/bin/env bash
# The main job: set up .venv on a fresh machine, make sure Fashion-MNIST is on disk (Debian package
# dataset-fashion-mnist), then run the default offline benchmark:
#   Fashion-MNIST-C severity 5, all 15 corruptions, source / BNAdapt(N=0) / BNAdapt(N=16) / Tent / EATA (its Fisher
#   from 2,000 source training images), reset each shift.
# The built-in source model is trained on first use (a few minutes on 2 CPU cores) and cached.
# Extra arguments go to `adaptkit bench` (e.g. --n-samples 2000 for a quicker run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash .ci/setup.sh)"
FMNIST=/usr/share/datasets/fashion-mnist
if [ -z "${ADAPTKIT_DATA:-}" ] && [ ! -e "$FMNIST/t10k-images-idx3-ubyte.gz" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..." >&2
  $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq dataset-fashion-mnist >&2
fi
exec "$PY" -m adaptkit bench --out "${ADAPTKIT_REPORT:-reports/main}" "$@"
