#!/usr/bin/env bash
# One node, NPROC processes, started by torchrun.
#
#   launchers/torchrun_single_node.sh CONFIG.yaml [section.key=value ...]
#   # configs/demo.yaml names no model or data: `lora-dist demo` writes tiny ones to runs/demo/
#   launchers/torchrun_single_node.sh configs/demo.yaml model.path=runs/demo/base data.path=runs/demo/data.jsonl
#   NPROC=4 launchers/torchrun_single_node.sh configs/demo.yaml parallel.strategy=zero3 model.path=runs/demo/base data.path=runs/demo/data.jsonl
#
# Each process gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
# MASTER_PORT from torchrun; lora_dist.launch.init_distributed() reads them (torchrun
# variables win over any Slurm/MPI ones, so this also works inside an srun task).
#
# Knobs (environment variables):
#   NPROC             processes; default: number of visible GPUs, or 2 on a CPU-only machine
#   OMP_NUM_THREADS   CPU threads per process; default 1 (torchrun would warn and set 1 anyway)
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  NPROC="$(python -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# --standalone: a private c10d rendezvous on localhost with a free port, so two jobs on
# one machine never fight over MASTER_PORT.
exec torchrun --standalone --nproc_per_node "${NPROC}" --no-python lora-dist train "$@"
