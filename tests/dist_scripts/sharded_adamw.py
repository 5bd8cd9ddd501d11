"""2 ranks: ShardedAdamW (reduce-scatter, 1/W of the AdamW state, all-gather) == one process's AdamW.

Each rank also builds the one-process reference locally (the whole global batch, torch's
AdamW, clip_grad_norm_) and compares after every step. Prints a JSON line on rank 0.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from lora_dist.lora import LoRAConfig, inject_lora, lora_modules
from lora_dist.parallel.sharded_adamw import ShardedAdamW

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
bucket_mb = float(sys.argv[1])


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 7))
    inject_lora(m, LoRAConfig(r=3, alpha=6, target_modules=["0", "2", "4"]))
    with torch.no_grad():
        for _, mod in lora_modules(m):
            mod.lora_B.weight.normal_(0, 0.1)
    return m


def named(m):
    return [(f"{n}.{part}.weight", getattr(mod, part).weight) for n, mod in lora_modules(m) for part in ("lora_A", "lora_B")]


ours, ref = model(), model()
opt = ShardedAdamW(named(ours), lr=1e-2, weight_decay=0.1, bucket_mb=bucket_mb)
ref_params = [p for _, p in named(ref)]
ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1)
total = sum(p.numel() for p in ref_params)
report = {"buckets": len(opt.buckets), "shard_numel": opt.shard.numel(), "total": total}
worst = 0.0
for step in range(4):
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(step))  # 2 micro-steps x 2 ranks x 2 rows
    micro = [x[0:4], x[4:8]]
    for k, m in enumerate(micro):
        ctx = opt.no_sync() if k == 0 else torch.enable_grad()
        with ctx:
            (ours(m[2 * rank:2 * rank + 2]).square().sum() / 8).backward()
        ref(m).square().sum().div(8).backward()
    norm = opt.step(1e-2 * (step + 1), max_grad_norm=0.5)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref_params, 0.5))
    for g in ref_opt.param_groups:
        g["lr"] = 1e-2 * (step + 1)
    ref_opt.step()
    ref_opt.zero_grad()
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
    for (name, p), q in zip(named(ours), ref_params):
        worst = max(worst, float((p - q).abs().max()))
report["max_param_diff"] = worst

moments = opt.state_dict()
ref_state = {f"{n}.{k}": ref_opt.state[p][k] for (n, _), p in zip(named(ref), ref_params) for k in ("exp_avg", "exp_avg_sq")}
report["moment_keys_match"] = sorted(moments) == sorted(ref_state)
report["max_moment_diff"] = max(float((moments[k] - ref_state[k]).abs().max()) for k in ref_state)

# Resume into a fresh optimizer (other bucket sizes): the next step equals the uninterrupted one.
fresh = model()
with torch.no_grad():
    for (_, p), (_, q) in zip(named(fresh), named(ours)):
        p.copy_(q)
resumed = ShardedAdamW(named(fresh), lr=1e-2, weight_decay=0.1, bucket_mb=bucket_mb / 3)
resumed.load_state_dict(moments, step=4)
x = torch.randn(4, 24, generator=torch.Generator().manual_seed(99))
for m, o in ((ours, opt), (fresh, resumed)):
    (m(x[2 * rank:2 * rank + 2]).square().sum() / 4).backward()
    o.step(1e-2, max_grad_norm=0.5)
report["resume_diff"] = max(float((p - q).abs().max()) for (_, p), (_, q) in zip(named(ours), named(fresh)))
replicas = [torch.cat([p.detach().reshape(-1) for _, p in named(ours)])]
gathered = [torch.empty_like(replicas[0]) for _ in range(world)]
dist.all_gather(gathered, replicas[0])
report["replicas_equal"] = all(torch.equal(gathered[0], g) for g in gathered)
if rank == 0:
    print(json.dumps(report))
dist.destroy_process_group()
