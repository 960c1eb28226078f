#!/usr/bin/env bash
# The test command (README, CI): sets up what is missing, runs the unit tests (including those on
# the real embedded model), then the format-compliance regression gate of the eval suite on the
# real model. Pipeline artifacts are cached under runs/: a second run reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
distiller models pull smollm2-135m-instruct
pytest tests -q "$@"
# The structure gate on the real model: the distilled student meets the spec's format-rate
# threshold (eval.thresholds.format_rate), and no model's format compliance (overall and per
# section) drops significantly against the committed reports/baseline.json. The teacher row is
# left to the main job to keep CI short.
pytest evals -m structure -q --distiller-models=vanilla,distilled
