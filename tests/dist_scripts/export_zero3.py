"""DeepSpeed ZeRO-3-partition a LoRA model over all ranks and export it merged.

    torchrun --nproc_per_node N export_zero3.py BASE WORK ARCH

Base params are partitioned (flat slices per rank); the LoRA params are small
enough to be persistent. Rank 0 saves the adapter to WORK/adapter first; the
export goes to WORK/merged_auto.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from export_common import build_lora_model, input_ids, finish

from lora_dist.adapter import save_adapter
from lora_dist.export import export_merged
from lora_dist.lora import lora_parameters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("work")
    p.add_argument("arch")
    args = p.parse_args()
    work = Path(args.work)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()

    model = build_lora_model(args.base, args.arch)
    if rank == 0:
        save_adapter(model, work / "adapter")
    lora_sizes = [p.numel() for p in lora_parameters(model)]
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": max(lora_sizes) + 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=lora_parameters(model), config=config)
    partitioned = [n for n, p in engine.module.named_parameters()
                   if "lora_" not in n and p.ds_tensor.numel() < p.ds_numel]
    assert partitioned, "ZeRO-3 partitioned no base param"
    with torch.no_grad():
        engine(input_ids())  # the model has been used, as after training
    export_merged(engine, work / "merged_auto", args.base, dtype=torch.float32, max_shard_size="200KB")
    dist.barrier()


if __name__ == "__main__":
    main()
    finish()
