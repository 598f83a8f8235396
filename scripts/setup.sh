#!/usr/bin/env bash
# One-command set-up: a .venv with the CPU torch 2.13.0 first (so pip never pulls a
# multi-GB CUDA build), then dbl_scale with its dev extra, versions pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
echo "set-up done: activate with 'source .venv/bin/activate'"
