#!/usr/bin/env bash
# The main job (README): sets up what is missing, fetches the embedded model, checks the machine,
# then distills the structured-CoT task and prints the teacher-vs-students table.
# Extra arguments go to `distiller run` (e.g. --limit 8 for a quick trial).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
distiller models pull smollm2-135m-instruct
distiller doctor
distiller run fixtures/tasks/structured_cot.yaml "$@"
