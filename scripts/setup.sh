#!/usr/bin/env bash
# Create a virtual environment and install lora_dist with its test extras.
# torch is installed first and pinned, so pip never resolves another torch (a newer one is several GB of CUDA packages).
#   bash scripts/setup.sh                 .venv with the tested versions (constraints.txt)
#   LATEST=1 bash scripts/setup.sh        .venv-latest with today's releases, and the newest torch these machines
#                                         hold on disk (TORCH_LATEST): its CUDA build, ~4 GB with its nvidia-* wheels,
#                                         installed from disk in under a minute; it runs on the CPU like the CPU build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${LATEST:-0}" = 1 ]; then venv=.venv-latest; torch=${TORCH_LATEST:-2.14.1}; else venv=.venv; torch=2.13.0; fi
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=$venv/install.log
quiet() { "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "setup failed: $*" >&2; exit 1; }; }
: >"$log"
quiet python -m pip install --upgrade pip
if [ "${LATEST:-0}" = 1 ]; then
  # The pin replaces a machine-wide pip constraint on torch (these machines cap it at what their disk holds), so
  # TORCH_LATEST=2.15.0 downloads today's torch (~3.5 GB with its CUDA wheels) where that is wanted.
  echo "torch==$torch" > "$venv/torch-only.txt"
  export PIP_CONSTRAINT="$venv/torch-only.txt"
  quiet python -m pip install "torch==$torch"
  quiet python -m pip install --upgrade --upgrade-strategy eager -e ".[test]"
else
  quiet python -m pip install -c constraints.txt "torch==$torch"
  quiet python -m pip install -c constraints.txt -e ".[test]"
fi
TORCH=$torch python - <<'PY'
import os
import torch
want = os.environ["TORCH"].split("+")[0]
assert torch.__version__.split("+")[0] == want, f"unexpected torch {torch.__version__}: the install must keep torch {want}"
PY
