#!/usr/bin/env bash
# The first-GPU check (docs/gpu.md): every CUDA/NCCL path once, within ~8 minutes on one GPU.
# Results: bench/results/gpu/<device>/results.{json,md}. Exit 1 if a check failed.
#   bash scripts/gpu_check.sh               on a GPU host (sets up .venv if missing: torch 2.13.0 from the
#                                           public index is a CUDA build on Linux x86_64)
#   bash scripts/gpu_check.sh --cpu-smoke   the CPU-possible checks on the CPU (CI runs this)
#   LORA_DIST_PYTHON=python3 bash scripts/gpu_check.sh --budget-s 400
#                                           an existing Python that has CUDA torch (an offline GPU image): the
#                                           repository goes on PYTHONPATH, nothing is installed
# More options: python scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
if [ -n "${LORA_DIST_PYTHON:-}" ]; then
  PY=$LORA_DIST_PYTHON
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  PY=.venv/bin/python
fi
case " $* " in
  *" --cpu-smoke "*) export CUDA_VISIBLE_DEVICES= ;;  # wherever it stands: the checks' own launches see no GPU
  *) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true ;;
esac
exec "$PY" scripts/gpu_check.py "$@"
