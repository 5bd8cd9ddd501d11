"""One rank of the test of a router kept in fp32: the model as ``strategy`` builds it from ``base`` in bf16, its
router weight and bias as the forward sees them (gathered), written by rank 0 to ``out`` (safetensors)."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import lora_dist

base, strategy, out = sys.argv[1:4]
model, engine = lora_dist.prepare(base, lora_dist.LoRAConfig(target_modules="all-linear"), strategy=strategy,
                                  dtype="bfloat16")
seen = {}
for name, module in model.named_modules():
    if name.endswith("mlp.gate") and hasattr(module, "moe_statics"):
        module.register_forward_pre_hook(lambda m, args, name=name: seen.update({
            f"{name}.weight": m.weight.detach().clone(),
            f"{name}.moe_statics.e_score_correction_bias": m.moe_statics.e_score_correction_bias.detach().clone()}))
engine.model(input_ids=torch.arange(16).view(1, 16))
if dist.get_rank() == 0:
    save_file(seen, out)
