#!/usr/bin/env bash
# The DeepSpeed launcher, over the hosts of a hostfile (see hostfile.example) or locally.
#
#   # configs/demo.yaml names no model or data: `lora-dist demo` writes tiny ones to runs/demo/
#   HOSTFILE=my_hosts launchers/deepspeed_hostfile.sh configs/demo.yaml parallel.strategy=zero3 \
#     model.path=runs/demo/base data.path=runs/demo/data.jsonl
#   NPROC=2 launchers/deepspeed_hostfile.sh configs/demo.yaml parallel.strategy=zero3 \
#     model.path=runs/demo/base data.path=runs/demo/data.jsonl   # this machine only
#   echo "localhost slots=2" > hosts    # a hostfile of this machine only: started locally, no pdsh
#   HOSTFILE=hosts NO_SSH_CHECK=1 MASTER_ADDR=127.0.0.1 launchers/deepspeed_hostfile.sh configs/demo.yaml \
#     parallel.strategy=zero3 model.path=runs/demo/base data.path=runs/demo/data.jsonl
#
# `deepspeed` logs in to every host of the hostfile (pdsh/ssh), starts one process per
# slot and gives each RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (plus
# CROSS_RANK/CROSS_SIZE/LOCAL_SIZE); lora_dist.launch reads them like torchrun's. The
# launcher only starts processes: ZeRO is selected with parallel.strategy=zero1|zero2|zero3
# in the lora_dist config or on the command line, and lora_dist builds the engine.
#
# Knobs (environment variables):
#   HOSTFILE          "hostname slots=N" per line; unset: run NPROC processes on this machine
#   NPROC             without HOSTFILE: processes on this machine; default: DeepSpeed's
#                     accelerator count
#   MASTER_ADDR       address of the first host that the others can reach (not localhost when
#                     there are several hosts); default: DeepSpeed asks the first host over ssh
#   MASTER_PORT       default 29500
#   NUM_NODES         use only the first N hosts of HOSTFILE; default: all
#   NO_SSH_CHECK=1    skip DeepSpeed's "is every host reachable by ssh" check (e.g. a hostfile
#                     holding only this machine); then set MASTER_ADDR too
#   OMP_NUM_THREADS   CPU threads per process; default 1
set -euo pipefail

MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# --no_local_rank: DeepSpeed would otherwise put --local_rank=N in front of our arguments
# (lora_dist takes LOCAL_RANK from the environment). --no_python: lora-dist is a program.
ds_args=(--master_port "${MASTER_PORT}" --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
  ds_args+=(--hostfile "${HOSTFILE}")
  if [[ -n "${NUM_NODES:-}" ]]; then ds_args+=(--num_nodes "${NUM_NODES}"); fi
  if [[ "${NO_SSH_CHECK:-0}" == 1 ]]; then ds_args+=(--no_ssh_check); fi
else
  # A hostfile path that cannot exist, so that a stray /job/hostfile is not picked up.
  ds_args+=(--hostfile /nonexistent/hostfile)
  if [[ -n "${NPROC:-}" ]]; then ds_args+=(--num_gpus "${NPROC}"); fi
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then ds_args+=(--master_addr "${MASTER_ADDR}"); fi

exec deepspeed "${ds_args[@]}" --no_python lora-dist train "$@"
