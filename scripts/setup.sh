#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh test     # + test extra; torch 2.13.0 first, so pip keeps it
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  # PyPI's Linux wheel is the CUDA build; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the CPU one
  python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
