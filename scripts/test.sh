#!/usr/bin/env bash
# The test command (README, CI): sets up what is missing, runs the unit tests (including those on
# the real embedded model), then the format-compliance gate of the eval suite on the real model
# against the committed baseline (reports/baseline.json). Artifacts are cached under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
distiller models pull smollm2-135m-instruct
pytest tests -q "$@"
pytest evals -m structure -q
