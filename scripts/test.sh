#!/usr/bin/env bash
# Run the test suite in the project virtualenv (created on first use).
#
#   bash scripts/test.sh                                   # everything (gpu tests skip without CUDA)
#   bash scripts/test.sh tests/fractal_pretrain -k export  # any pytest arguments
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup-env.sh
.venv/bin/python -m pytest "$@"
