#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with distiller installed, and (on Linux) an
# optimized BLAS for MLX. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${DISTILLER_VENV:-.venv}

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# 1. Optimized BLAS (Linux). MLX's PyPI CPU wheel ships a reference BLAS ~40x slower at float32
#    matmul; distiller loads OpenBLAS in its place at import time when the system has it.
if [[ "$(uname -s)" == Linux ]] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so'; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    log "installing OpenBLAS (libopenblas0-pthread) for fast MLX on CPU"
    $SUDO apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  elif command -v dnf >/dev/null; then
    log "installing OpenBLAS (openblas) for fast MLX on CPU"
    sudo dnf install -y -q openblas
  else
    log "WARNING: no OpenBLAS and no known package manager; MLX will be slow on CPU (see README)"
  fi
fi

# 1b. Chromium and its driver (Linux with apt): the test of distiller serve's page drives them
#     headless (tests/test_serve.py; it skips without them). Never a browser download.
if [[ "$(uname -s)" == Linux ]] && ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  log "installing chromium and chromium-driver (the browser test of distiller serve's page)"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
    || log "WARNING: chromium not installed; the browser test will be skipped"
fi

# 2. Virtual environment with distiller and its dependencies, refreshed when pyproject changes.
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# DISTILLER_MKL=1 adds oneMKL (the `mkl` extra, ~230 MB): distiller then loads it in place of
# OpenBLAS, and single-stream decode runs ~3x faster (README "Decode speed").
EXTRAS=dev
[[ "${DISTILLER_MKL:-0}" == 1 ]] && EXTRAS=dev,mkl
stamp="$VENV/.distiller-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  log "installing distiller and dependencies into $VENV"
  pip_log="$VENV/pip-install.log"
  if ! "$VENV/bin/python" -m pip install -e ".[$EXTRAS]" >"$pip_log" 2>&1; then
    tail -n 30 "$pip_log" >&2
    log "pip install failed; full log in $pip_log"
    exit 1
  fi
  "$VENV/bin/python" -c "import distiller, mlx_lm" # fail loudly if the install did not work
  echo "$want" > "$stamp"
fi
