#!/usr/bin/env bash
# The test command (README, CI): sets up what is missing, then runs the unit tests (including
# those on the real embedded model) and the format-compliance gate of the eval suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
distiller models pull smollm2-135m-instruct
pytest tests -q "$@"
