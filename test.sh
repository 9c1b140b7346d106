#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (CPU; CUDA-only tests skip themselves without a GPU).
set -euo pipefail
cd "$(dirname "$0")"
source speedrun/bootstrap.sh
# two worker processes (pytest-xdist): most tests run single-threaded subprocesses, so 2 cores do twice the work; a
# later `-n N` in the arguments wins (`-n 0`: one process, e.g. for pdb)
exec "$PYTHON" -m pytest -n 2 tests "$@"
