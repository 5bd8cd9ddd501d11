"""Build a model with a strategy, run one step, and report what each rank holds (JSON per rank)."""

import json
import os
import sys

import torch
import torch.distributed as dist
from counted_reads import counted_reads
from transformers import AutoConfig

from lora_dist.config import load_config
from lora_dist.launch import init_distributed
from lora_dist.lora import lora_parameters
from lora_dist.loss import token_loss_sum
from lora_dist.model import load_model
from lora_dist.parallel import ReplicaMismatchError, check_replicas
from lora_dist.parallel.deepspeed import deepspeed_config
from lora_dist.session import make_engine

out_dir, *overrides = sys.argv[1:]
env = init_distributed()
cfg = load_config(None, overrides)
hf_config = AutoConfig.from_pretrained(cfg.model.path)
ds = deepspeed_config(cfg, hf_config) if cfg.parallel.strategy.startswith("zero") else None
with counted_reads() as reads:  # a rank reads only its own rows / partitions
    model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0, ds).model
read_bytes = reads["bytes"]
lora = {id(p) for p in lora_parameters(model)}
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine = make_engine(model, opt, cfg.parallel, cfg.train, torch.device("cpu"), ds)
ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(env.rank))
logits = engine.model(input_ids=ids).logits
engine.backward(token_loss_sum(logits, ids) / ids.numel())
engine.step(1e-3)

report = {"rank": env.rank, "read_bytes": read_bytes, "base_local_bytes": 0, "base_full_bytes": 0, "base_types": set(), "base_with_grad": [],
          "base_requires_grad": [], "optimizer_params": 0, "lora_numel": 0, "optimizer_numel": 0,
          "optimizer_state_numel": 0, "lora_not_whole": []}
for name, p in model.named_parameters():
    if id(p) in lora:
        report["lora_numel"] += p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
        if p.data.numel() != getattr(p, "ds_numel", p.numel()) or hasattr(p, "to_local"):
            report["lora_not_whole"].append(name)  # LoRA params must stay whole, plain tensors on every rank
        continue
    full_numel = getattr(p, "ds_numel", p.numel())
    if hasattr(p, "ds_tensor"):
        # Its partition, plus the whole tensor where ZeRO-3 keeps one resident (persistent params).
        local = p.ds_tensor.numel() + p.data.numel()
        report["base_types"].add("zero3-partition")
    elif hasattr(p, "to_local"):
        local = p.to_local().numel()
        from torch.distributed.tensor import Shard

        shard0 = len(p.placements) == 1 and isinstance(p.placements[0], Shard) and p.placements[0].dim == 0
        report["base_types"].add("DTensor-Shard(0)" if shard0 else f"DTensor{p.placements}")
    else:
        local = p.numel()
        report["base_types"].add("Tensor")
    report["base_local_bytes"] += local * p.element_size()
    report["base_full_bytes"] += full_numel * p.element_size()
    if p.grad is not None:
        report["base_with_grad"].append(name)
    if p.requires_grad:
        report["base_requires_grad"].append(name)
# What steps the LoRA: ZeRO-1 over the LoRA (fsdp2, W > 1), or DeepSpeed's inner optimizer (zero3).
inner = engine.sharded.optimizer if engine.sharded is not None else getattr(engine.optimizer, "optimizer",
                                                                                engine.optimizer)
report["sharded_lora_optimizer"] = engine.sharded is not None
for group in inner.param_groups:
    for p in group["params"]:
        report["optimizer_numel"] += p.numel()
for state in inner.state.values():
    report["optimizer_state_numel"] += sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
report["base_types"] = sorted(report["base_types"])
# DeepSpeed's reduce bucket (allocated whole, kept for the engine's life): capped at the LoRA size.
report["reduce_bucket_numel"] = getattr(engine.optimizer, "reduce_bucket_size", None)

# The replica check passes on healthy replicas and names a perturbed one.
check_replicas(engine)
first_b = [n for n, _ in model.named_parameters() if n.endswith("lora_B.weight")][0]
if env.rank == 1:
    with torch.no_grad():
        dict(model.named_parameters())[first_b].data.add_(1e-3)
try:
    check_replicas(engine)
    report["perturbed_detected"] = None
except ReplicaMismatchError as e:
    report["perturbed_detected"] = str(e)
report["perturbed_name"] = first_b

# The end of training: what only further steps need is freed before the export. A no-grad
# forward last (an eval) leaves ZeRO-3 base weights gathered: no backward releases them.


def gathered_base() -> int | None:
    if not ds or ds["zero_optimization"]["stage"] != 3:  # only ZeRO-3 gathers the base
        return None
    threshold = ds["zero_optimization"]["stage3_param_persistence_threshold"]  # below it: always whole
    return sum(1 for p in model.parameters() if id(p) not in lora and p.ds_numel > threshold and p.data.numel() > 0)


with torch.no_grad():
    engine.model(input_ids=ids)
report["gathered_base_before_finish"] = gathered_base()
engine.finish_training()
report["after_finish"] = {
    "lora_grads": sum(p.grad is not None for p in lora_parameters(model)),
    "optimizer_state_tensors": sum(len(s) for s in inner.state.values()),
    "reduce_buckets": sum(b.buffer.numel() for b in getattr(engine.optimizer, "ipg_buckets", {}).values()
                          if getattr(b, "buffer", None) is not None),
    "gathered_base": gathered_base(),
}
with open(f"{out_dir}/rank{env.rank}.json", "w") as f:
    json.dump(report, f)
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # as lora-dist does: skip interpreter teardown once everything is written
