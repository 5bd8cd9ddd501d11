#!/usr/bin/env bash
# Set up (.venv, pinned torch 2.13.0 CPU) and run the whole test suite.
# Tests marked `cluster` bring up a local two-node Slurm cluster in network namespaces;
# they need root and skip, with the reason, where that is impossible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# The suite is the CPU suite (gloo): on a GPU host torch would pick NCCL and the 2-rank CPU tests would
# break, so no GPU is visible to it. scripts/gpu_check.sh is the GPU check.
export CUDA_VISIBLE_DEVICES=
# pytest-xdist workers (scripts/workers.sh), a module's tests on one worker and the cluster tests on one
# (tests/conftest.py); LORA_DIST_TEST_WORKERS=0 runs everything in this process.
. scripts/workers.sh
exec python -m pytest -ra -n "$TEST_WORKERS" "$@"
