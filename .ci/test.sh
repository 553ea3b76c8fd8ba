#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then runs the test suite (doctests included).
# Extra arguments go to pytest, e.g. `bash .ci/test.sh --runslow`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash .ci/setup.sh)"
# Two worker processes (the machine's 2 cores; each test runs torch on 1 thread), whole files per worker so that
# module-level caches and fixtures behave as in a serial run. ADAPTKIT_TEST_WORKERS=0 runs serially.
WORKERS="${ADAPTKIT_TEST_WORKERS:-2}"
XDIST=()
if [ "$WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$WORKERS" --dist loadfile)
fi
set +e
"$PY" -m pytest -q ${XDIST[@]+"${XDIST[@]}"} "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests collected"; rc=0; fi
exit "$rc"
