"""FSDP2-shard a LoRA model over all ranks and export it merged.

    torchrun --nproc_per_node N export_fsdp2.py BASE WORK ARCH [--modes auto,gather,blind,ddp] [--fail-rank K]

Rank 0 first saves the (random, non-zero) adapter to WORK/adapter, so the
test can compute the single-process merge. Each mode writes WORK/merged_<mode>
("blind" is "auto" with rank 1 unable to see the output dir, as on node-local
disks; "ddp" exports a DDP-wrapped unsharded copy) and WORK/result_<rank>.json records the tensor bytes each rank wrote.
With --fail-rank K, rank K's writes fail with ENOSPC; every rank must raise,
and WORK/result_<rank>.json records what each saw.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import torch
import torch.distributed as dist
from export_common import build_lora_model, finish, input_ids, sharded_lora_model, write_result
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lora_dist.export import ExportError, export_merged, layout, writer

real_sees_probe = writer.sees_probe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("work")
    p.add_argument("arch")
    p.add_argument("--modes", default="auto")
    p.add_argument("--fail-rank", type=int, default=None)
    p.add_argument("--max-shard-size", default="200KB")
    args = p.parse_args()
    work = Path(args.work)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    model, lora = sharded_lora_model(args.base, args.arch, work / "adapter")
    base_params = [p for p in model.parameters() if p not in lora]
    assert all(isinstance(p, DTensor) for p in base_params), "fully_shard left a base param unsharded"
    assert not any(isinstance(p, DTensor) for p in lora), "LoRA params must stay replicated"
    with torch.no_grad():
        model(input_ids())  # the model has been used, as after training

    if args.fail_rank is not None:
        if rank == args.fail_rank:
            def no_space(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            layout.pwrite_tensor = no_space
        try:
            export_merged(model, work / "merged_fail", args.base, dtype=torch.float32,
                          max_shard_size=args.max_shard_size, mode=args.modes)
            write_result(work / f"result_{rank}.json", {"raised": None})
        except ExportError as e:
            write_result(work / f"result_{rank}.json", {"raised": str(e)})
    else:
        written: list[int] = []
        real = layout.pwrite_tensor

        def counting(fd, tensor, offset):
            written.append(tensor.numel() * tensor.element_size())
            real(fd, tensor, offset)

        layout.pwrite_tensor = counting
        result = {}
        for mode in args.modes.split(","):
            # "blind": rank 1 cannot see the output dir, like a node-local disk; "ddp": a replicated, wrapped copy.
            writer.sees_probe = (lambda staging, token: False) if mode == "blind" and rank == 1 else real_sees_probe
            target = DistributedDataParallel(build_lora_model(args.base, args.arch)) if mode == "ddp" else model
            written.clear()
            out = export_merged(target, work / f"merged_{mode}", args.base, dtype=torch.float32,
                                max_shard_size=args.max_shard_size, mode=mode if mode in ("auto", "gather") else "auto")
            assert out == (work / f"merged_{mode}").absolute()
            result[mode] = sum(written)
        write_result(work / f"result_{rank}.json", result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    finish()
