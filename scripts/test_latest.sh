#!/usr/bin/env bash
# The distributed training, export, MoE, data-source, chat-template, data, LoRA-injection, model-dir, NF4,
# quantized-checkpoint, loss, parallel (FSDP2, ZeRO, compiled blocks...), checkpoint-resume (across world sizes and
# strategies), eval, cockpit and trainer-integration tests against today's releases of transformers, accelerate, deepspeed, peft, datasets, trl and
# torchao, and torch 2.14.1 (the newest torch these machines hold on disk; scripts/setup.sh), in .venv-latest next to
# the pinned .venv. Users `pip install` today's releases, not our pins; .ci/run runs this after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
LATEST=1 bash scripts/setup.sh
. .venv-latest/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES=
python - <<'PY'
from importlib.metadata import version
print("today's releases:", ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "accelerate", "deepspeed", "peft", "datasets", "trl", "torchao")))
PY
. scripts/workers.sh
exec python -m pytest -ra -n "$TEST_WORKERS" tests/test_train_dist.py tests/export/test_run_export.py tests/export/test_export.py \
    tests/test_moe.py tests/test_hub_archs.py tests/test_sources.py tests/test_chat.py tests/test_data.py tests/test_lora.py \
    tests/test_model_dir.py tests/test_nf4.py tests/test_prequantized.py tests/test_chunked_loss.py tests/parallel tests/integrations \
    tests/test_checkpoint.py::test_checkpoint_layout_and_pruning tests/test_checkpoint.py::test_exact_resume_single_process \
    tests/test_checkpoint.py::test_resume_on_another_world_size_and_strategy tests/test_checkpoint.py::test_resume_one_to_three_ranks \
    tests/test_eval.py tests/test_cockpit.py "$@"
