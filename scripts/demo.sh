#!/usr/bin/env bash
# Set up (.venv, pinned torch 2.13.0 CPU) and run the main job end to end:
# build a tiny Llama checkpoint, fine-tune it with LoRA on 2 CPU processes (FSDP2 over gloo),
# and write + verify the merged HF checkpoint from the sharded state.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec lora-dist demo "$@"
