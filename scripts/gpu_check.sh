#!/usr/bin/env bash
# The first-GPU check (docs/gpu.md): every CUDA/NCCL path once, within ~8 minutes on one GPU.
# Results: bench/results/gpu/<device>/results.{json,md}. Exit 1 if a check failed.
#   bash scripts/gpu_check.sh               on a GPU host (sets up .venv if missing: torch 2.13.0 from the
#                                           public index is a CUDA build on Linux x86_64)
#   bash scripts/gpu_check.sh --cpu-smoke   the CPU-possible checks on the CPU (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--cpu-smoke" ]; then
  export CUDA_VISIBLE_DEVICES=
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec python scripts/gpu_check.py "$@"
