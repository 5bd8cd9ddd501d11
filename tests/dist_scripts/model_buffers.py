"""One rank of the test of a model's buffers: the model as ``strategy`` builds it from ``base`` in bf16, its buffers
(rotary tables...) written by rank 0 to ``out`` (safetensors)."""

import sys

import torch.distributed as dist
from safetensors.torch import save_file

import lora_dist

base, strategy, out = sys.argv[1:4]
model, engine = lora_dist.prepare(base, lora_dist.LoRAConfig(target_modules="all-linear"), strategy=strategy,
                                  dtype="bfloat16")
if dist.get_rank() == 0:
    save_file({name: b.detach().cpu().contiguous() for name, b in model.named_buffers()}, out)
