#!/usr/bin/env bash
# Wheels for a GPU host with no package index whose Python already has CUDA torch (docs/gpu.md): lora_dist's
# dependencies beyond torch, at the versions of the tested environment (.venv, from constraints.txt).
#   bash scripts/wheelhouse.sh [DIR]     DIR defaults to .whl (ignored by git); PY_VERSION=3.12 is the host's Python
# Then, on the GPU host:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#   LORA_DIST_PYTHON=python3 bash scripts/gpu_check.sh --budget-s 450
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
py=${PY_VERSION:-3.12}
[ -x .venv/bin/python ] || bash scripts/setup.sh
# What transformers, PEFT, DeepSpeed and torchao need that a CUDA image with torch and accelerate may lack or hold
# at older versions (huggingface-hub 2 needs httpx2 and a newer click, transformers a newer regex).
packages=(transformers peft deepspeed torchao huggingface-hub tokenizers safetensors regex hf-xet click httpx2
          httpcore2 truststore pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson)
mkdir -p "$out"
frozen=$(.venv/bin/python -m pip freeze --all 2>/dev/null)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
for name in "${packages[@]}"; do
  pattern=$(echo "$name" | sed 's/[-_]/[-_]/g')
  pin=$(echo "$frozen" | grep -i -E "^${pattern}==" | head -1 || true)
  [ -n "$pin" ] || { echo "wheelhouse: $name is not installed in .venv; run bash scripts/setup.sh" >&2; exit 1; }
  if [ "$name" = deepspeed ]; then  # an sdist only: built here, no ops compiled (DeepSpeed builds them when used)
    python3 -m pip wheel -q --no-deps --no-build-isolation "$pin" -w "$out"
  else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      "${platforms[@]}" -d "$out" "$pin"
  fi
done
ls "$out"
du -sh "$out"
