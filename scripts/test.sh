#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: lint, type check, tests (as root: they mount).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
