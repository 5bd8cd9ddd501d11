"""2 ranks: the ddp engine (DDP's all-reduce, ``parallel.shard_optimizer=false``), or DeepSpeed's zero1/zero2
engine (argv[1]), starts every rank from rank 0's LoRA, and leaves the frozen base and the buffers as each rank loaded
them: no base bytes are broadcast.

Each rank's base weight, buffer and LoRA A are made rank-specific before the engine wraps the model. Prints a JSON
line on rank 0.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from lora_dist.config import ParallelConfig, TrainConfig
from lora_dist.lora import LoRAConfig, inject_lora
from lora_dist.session import make_engine

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
model.register_buffer("table", torch.zeros(3))
inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["0", "2"]))
with torch.no_grad():
    model[0].weight.fill_(rank)
    model.table.fill_(rank)
    model[0].lora_A.weight.fill_(rank + 1)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
strategy = sys.argv[1] if len(sys.argv) > 1 else "ddp"
ds_config = {"zero_optimization": {"stage": int(strategy[-1])}, "zero_allow_untested_optimizer": True,
             "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
             "steps_per_print": 10**9} if strategy.startswith("zero") else None
engine = make_engine(model, optimizer, ParallelConfig(strategy=strategy, shard_optimizer=False), TrainConfig(),
                     torch.device("cpu"), ds_config)
# a step's forward (where DDP would sync the buffers) and backward
engine.backward(engine.model(torch.ones(2, 8)).sum())
seen = [None, None]
dist.all_gather_object(seen, {"base": model[0].weight.unique().tolist(), "buffer": model.table.unique().tolist(),
                              "lora_A": model[0].lora_A.weight.unique().tolist(),
                              "wrapped": type(engine.model).__name__})
if rank == 0:
    print(json.dumps(seen))
del engine  # DDP's reducer before its group: destroyed after it, it can hang the exit
dist.destroy_process_group()
