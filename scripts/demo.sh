#!/usr/bin/env bash
# Sets everything up, then runs the live demonstration on a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fsfilter demo "$@"
