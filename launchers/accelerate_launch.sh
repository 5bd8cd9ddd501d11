#!/usr/bin/env bash
# `accelerate launch` as a process launcher for lora_dist.
#
#   launchers/accelerate_launch.sh configs/demo.yaml [section.key=value ...]
#   ACCELERATE_CONFIG=launchers/accelerate_deepspeed.yaml launchers/accelerate_launch.sh configs/demo.yaml
#
# accelerate starts the processes (torchrun underneath) and lora_dist does the rest:
# LoRA injection, then FSDP2 or DeepSpeed ZeRO according to parallel.strategy. The
# accelerate configs in this directory therefore use distributed_type MULTI_GPU.
#
# Knobs (environment variables):
#   ACCELERATE_CONFIG   accelerate config file; default launchers/accelerate_fsdp2.yaml
#   STRATEGY            parallel.strategy added before your overrides (yours still win);
#                       default: fsdp2 for accelerate_fsdp2.yaml, zero3 for
#                       accelerate_deepspeed.yaml, nothing for other files
#   NUM_PROCESSES       overrides num_processes (total over all machines)
#   NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT
#                       multi-node: run the script on every machine with its MACHINE_RANK;
#                       MAIN_PROCESS_IP is machine 0's address reachable from the others
#   OMP_NUM_THREADS     CPU threads per process; default 1
set -euo pipefail

ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$(dirname "$0")/accelerate_fsdp2.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ -z "${STRATEGY+set}" ]]; then
  case "$(basename "${ACCELERATE_CONFIG}")" in
    accelerate_fsdp2.yaml) STRATEGY=fsdp2 ;;
    accelerate_deepspeed.yaml) STRATEGY=zero3 ;;
    *) STRATEGY="" ;;
  esac
fi

acc_args=(--config_file "${ACCELERATE_CONFIG}")
if [[ -n "${NUM_PROCESSES:-}" ]]; then acc_args+=(--num_processes "${NUM_PROCESSES}"); fi
if [[ -n "${NUM_MACHINES:-}" ]]; then acc_args+=(--num_machines "${NUM_MACHINES}"); fi
if [[ -n "${MACHINE_RANK:-}" ]]; then acc_args+=(--machine_rank "${MACHINE_RANK}"); fi
if [[ -n "${MAIN_PROCESS_IP:-}" ]]; then acc_args+=(--main_process_ip "${MAIN_PROCESS_IP}"); fi
if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then acc_args+=(--main_process_port "${MAIN_PROCESS_PORT}"); fi

# The strategy override goes right after the config file (the CLI takes the file
# first) and before the user's overrides, so an explicit parallel.strategy=... wins.
if [[ -n "${STRATEGY}" ]]; then
  if [[ "${1:-}" == *.yaml || "${1:-}" == *.yml ]]; then
    set -- "$1" "parallel.strategy=${STRATEGY}" "${@:2}"
  else
    set -- "parallel.strategy=${STRATEGY}" "$@"
  fi
fi

exec accelerate launch "${acc_args[@]}" -m lora_dist.cli train "$@"
