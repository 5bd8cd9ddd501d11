"""Shared by the export tests and the torchrun scripts they launch.

The scripts import this file as ``export_common`` (their own dir is on
``sys.path``); the tests import it as ``dist_scripts.export_common``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

SCRIPTS = Path(__file__).resolve().parent


#: Every projection of each architecture the export tests use.
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def build_lora_model(base: str | Path, arch: str, seed: int = 1234, r: int = 4):
    """The base model in fp32 with LoRA on every projection and random non-zero A and B (same on every rank)."""
    from transformers import AutoModelForCausalLM

    from lora_dist.lora import LoRAConfig, inject_lora, lora_modules

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS[arch]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    return model


def blocks(model: nn.Module) -> nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, nn.ModuleList))


def sharded_lora_model(base: str | Path, arch: str, adapter_dir: Path):
    """:func:`build_lora_model`, its adapter saved by rank 0, then FSDP2 per block and root with the
    LoRA params ignored (replicated); returns the model and its LoRA params."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_dist.adapter import save_adapter
    from lora_dist.lora import lora_parameters

    model = build_lora_model(base, arch)
    if dist.get_rank() == 0:
        save_adapter(model, adapter_dir)
    lora = set(lora_parameters(model))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=lora)
    fully_shard(model, mesh=mesh, ignored_params=lora)
    return model, lora


def input_ids(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 400, (batch, length), generator=torch.Generator().manual_seed(7))


def write_result(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result))


def finish(code: int = 0) -> None:
    """End a worker as lora-dist does: destroy the process group, skip interpreter teardown."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
