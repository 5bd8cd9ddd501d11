"""2 ranks: DeepSpeed zero1/zero2/zero3 (the overrides name the strategy and dtype) trains one step, then a second under
``LiveTensorBytes``; rank 0 prints a JSON line: the planner's terms and total, the measured peak of live tensor bytes
of that second step, and the dtype DeepSpeed holds the LoRA params in."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: distutil, also where torchrun starts it
from distutil import step_peak  # noqa: E402

from lora_dist.config import load_config
from lora_dist.launch import init_distributed
from lora_dist.lora import lora_parameters
from lora_dist.model import load_model
from lora_dist.parallel.deepspeed import deepspeed_config
from lora_dist.plan import plan_memory
from lora_dist.session import make_engine

torch.set_num_threads(1)
env = init_distributed()
cfg = load_config(None, sys.argv[1:])
ds = deepspeed_config(cfg, AutoConfig.from_pretrained(cfg.model.path))
model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0, ds).model
optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
engine = make_engine(model, optimizer, cfg.parallel, cfg.train, torch.device("cpu"), ds)
ids = torch.randint(0, model.config.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len),
                    generator=torch.Generator().manual_seed(env.rank))

peak = torch.tensor([step_peak(engine, ids)], dtype=torch.float64)
dist.all_reduce(peak, op=dist.ReduceOp.MAX)
if env.rank == 0:
    plan = plan_memory(cfg, env.world_size)
    print(json.dumps({"plan": plan.as_dict(), "total": plan.total, "peak": int(peak),
                      "lora_dtype": str(lora_parameters(model)[0].dtype)}))
dist.destroy_process_group()
