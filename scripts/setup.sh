#!/usr/bin/env bash
# Create a virtual environment and install lora_dist with its test extras.
# torch is installed first and pinned so pip never pulls a CUDA build.
#   bash scripts/setup.sh                 .venv with the tested versions (constraints.txt)
#   LATEST=1 bash scripts/setup.sh        .venv-latest with today's releases of everything but torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${LATEST:-0}" = 1 ]; then venv=.venv-latest; else venv=.venv; fi
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=$venv/install.log
quiet() { "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "setup failed: $*" >&2; exit 1; }; }
: >"$log"
quiet python -m pip install --upgrade pip
quiet python -m pip install -c constraints.txt "torch==2.13.0"
if [ "${LATEST:-0}" = 1 ]; then
  grep '^torch==' constraints.txt > "$venv/torch-only.txt"
  quiet python -m pip install --upgrade --upgrade-strategy eager -c "$venv/torch-only.txt" -e ".[test]"
else
  quiet python -m pip install -c constraints.txt -e ".[test]"
fi
python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}: the install must keep torch 2.13.0"
PY
