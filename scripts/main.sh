#!/usr/bin/env bash
# The main job (README): sets up what is missing, fetches the embedded model, checks the machine
# and generates with the model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
distiller models pull smollm2-135m-instruct
distiller doctor
distiller generate --model smollm2-135m-instruct --max-tokens 64 \
  --prompt "In two sentences: what is a network partition?"
