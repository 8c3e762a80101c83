#!/usr/bin/env bash
# Set up the environment (with the test extra) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python -m pytest "$@"
