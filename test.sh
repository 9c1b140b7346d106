#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (CPU; CUDA-only tests skip themselves without a GPU).
set -euo pipefail
cd "$(dirname "$0")"
source speedrun/bootstrap.sh
exec "$PYTHON" -m pytest tests "$@"
