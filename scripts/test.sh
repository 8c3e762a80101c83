#!/usr/bin/env bash
# Set up the environment (with the test extra) and run the whole test suite: one pytest worker per
# core (at most 4), each taking whole test files, so a module's fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python -m pytest -n auto --maxprocesses 4 --dist loadfile "$@"
