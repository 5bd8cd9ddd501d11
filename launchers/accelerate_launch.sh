#!/usr/bin/env bash
# `accelerate launch` as a process launcher for lora_dist.
#
#   launchers/accelerate_launch.sh CONFIG.yaml [section.key=value ...]
#   # configs/demo.yaml names no model or data: `lora-dist demo` writes tiny ones to runs/demo/
#   launchers/accelerate_launch.sh configs/demo.yaml model.path=runs/demo/base data.path=runs/demo/data.jsonl
#   ACCELERATE_CONFIG=launchers/accelerate_deepspeed.yaml launchers/accelerate_launch.sh configs/demo.yaml \
#     model.path=runs/demo/base data.path=runs/demo/data.jsonl
#
# accelerate starts the processes (torchrun underneath) and lora_dist does the rest:
# LoRA injection, then FSDP2 or DeepSpeed ZeRO according to parallel.strategy. This
# script reads the strategy from the accelerate config's content and adds it as
# parallel.strategy=...:
#   distributed_type FSDP + fsdp_config.fsdp_version 2     -> fsdp2 (version 1 is refused)
#   distributed_type DEEPSPEED + deepspeed_config.zero_stage N -> zeroN (N = 1, 2, 3)
#   anything else (MULTI_GPU, MULTI_CPU, ...)              -> nothing added: the lora_dist
#                                                             config's parallel.strategy
#
# Knobs (environment variables):
#   ACCELERATE_CONFIG   accelerate config file; default launchers/accelerate_fsdp2.yaml
#   STRATEGY            parallel.strategy added before your overrides instead of the one
#                       read from ACCELERATE_CONFIG ("" adds none); an explicit
#                       parallel.strategy=... among your arguments wins over both
#   NUM_PROCESSES       overrides num_processes (total over all machines)
#   NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT
#                       multi-node: run the script on every machine with its MACHINE_RANK;
#                       MAIN_PROCESS_IP is machine 0's address reachable from the others
#   OMP_NUM_THREADS     CPU threads per process; default 1
set -euo pipefail

ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$(dirname "$0")/accelerate_fsdp2.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# Prints the strategy (or nothing); a config lora_dist cannot honour stops here with code 2.
config_strategy="$(python - "${ACCELERATE_CONFIG}" <<'PY'
import sys
import yaml

path = sys.argv[1]
def fail(message):
    print(f"accelerate_launch.sh: {path}: {message}", file=sys.stderr)
    sys.exit(2)
try:
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
except (OSError, yaml.YAMLError) as err:
    fail(f"cannot read accelerate config ({err})")
kind = str(cfg.get("distributed_type", "NO")).upper()
section, used = {"FSDP": ("fsdp_config", {"fsdp_version"}),
                 "DEEPSPEED": ("deepspeed_config", {"zero_stage", "deepspeed_multinode_launcher",
                                                     "deepspeed_hostfile"})}.get(kind, (None, set()))
options = (cfg.get(section) or {}) if section else {}
if kind == "FSDP":
    if str(options.get("fsdp_version", 1)) != "2":
        fail("distributed_type FSDP needs fsdp_config.fsdp_version: 2 (lora_dist shards with FSDP2 only)")
    strategy = "fsdp2"
elif kind == "DEEPSPEED":
    if options.get("deepspeed_config_file"):
        fail("deepspeed_config_file is not used: lora_dist builds the DeepSpeed config from parallel.*; "
             "remove it and set deepspeed_config.zero_stage")
    if str(options.get("zero_stage")) not in ("1", "2", "3"):
        fail("distributed_type DEEPSPEED needs deepspeed_config.zero_stage: 1, 2 or 3")
    strategy = f"zero{options['zero_stage']}"
else:
    strategy = ""
    print(f"accelerate_launch.sh: {path}: distributed_type {kind}: no strategy in the accelerate config, "
          "parallel.strategy comes from the lora_dist config", file=sys.stderr)
ignored = sorted(set(options) - used)
if ignored:
    print(f"accelerate_launch.sh: {path}: ignored {section} keys (lora_dist does the wrapping; use parallel.*): "
          + ", ".join(ignored), file=sys.stderr)
if str(cfg.get("mixed_precision", "no")) != "no":
    print(f"accelerate_launch.sh: {path}: mixed_precision is ignored; precision is model.dtype / "
          "parallel.mixed_precision in the lora_dist config", file=sys.stderr)
print(strategy)
PY
)"
if [[ -z "${STRATEGY+set}" ]]; then
  STRATEGY="${config_strategy}"
fi
if [[ -n "${STRATEGY}" ]]; then
  echo "accelerate_launch.sh: ${ACCELERATE_CONFIG} -> parallel.strategy=${STRATEGY}" >&2
fi

acc_args=(--config_file "${ACCELERATE_CONFIG}")
if [[ -n "${NUM_PROCESSES:-}" ]]; then acc_args+=(--num_processes "${NUM_PROCESSES}"); fi
if [[ -n "${NUM_MACHINES:-}" ]]; then acc_args+=(--num_machines "${NUM_MACHINES}"); fi
if [[ -n "${MACHINE_RANK:-}" ]]; then acc_args+=(--machine_rank "${MACHINE_RANK}"); fi
if [[ -n "${MAIN_PROCESS_IP:-}" ]]; then acc_args+=(--main_process_ip "${MAIN_PROCESS_IP}"); fi
if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then acc_args+=(--main_process_port "${MAIN_PROCESS_PORT}"); fi

# The strategy override goes right after the config file (the CLI takes the file
# first: a first argument without "=", or a .yaml/.yml path) and before the user's
# overrides, so an explicit parallel.strategy=... wins.
if [[ -n "${STRATEGY}" ]]; then
  if [[ -n "${1:-}" && "$1" != -* && ( "$1" != *=* || "$1" == *.yaml || "$1" == *.yml ) ]]; then
    set -- "$1" "parallel.strategy=${STRATEGY}" "${@:2}"
  else
    set -- "parallel.strategy=${STRATEGY}" "$@"
  fi
fi

exec accelerate launch "${acc_args[@]}" -m lora_dist.cli train "$@"
