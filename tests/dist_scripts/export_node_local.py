"""FSDP2 merged export where every rank sees its own disk at the output path, like node-local /scratch.

    torchrun --nproc_per_node N export_node_local.py BASE WORK ARCH

WORK holds ``scratch/`` (the output path, the same on every rank) and one
private dir per rank, ``rank<R>-disk/``, each holding a ``.disk-id`` file
with its own name. Each worker first re-execs itself under
``unshare --mount --propagation private`` (same pid, so torchrun keeps
watching it), then bind-mounts ``WORK/rank<R>-disk`` onto ``WORK/scratch``
in its own mount namespace: every rank sees a different, real directory at
``WORK/scratch`` and none sees another rank's files, while the rest of the
filesystem (the base checkpoint, WORK itself) is the same for all. Nothing
in the export is patched; ``writer.sees_probe`` and ``writer.choose_gather``
(lora_dist.export.writer) are only wrapped to record what they returned.

Rank 0 saves the adapter to WORK/adapter. The script exports twice:
``mode="shared"`` into WORK/scratch/merged_shared (must fail on every rank,
since rank 1 cannot see rank 0's staging dir) and ``mode="auto"`` into
WORK/scratch/merged (must fall back to rank 0 collecting). Each rank writes
WORK/result_<rank>.json (outside the mount, so the test reads all of them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_NAMESPACE_ENV = "LORA_DIST_TEST_NODE_LOCAL_RANK"


def enter_node_local_disk(work: Path) -> str:
    """Re-exec into a private mount namespace, then bind this rank's disk onto WORK/scratch; the disk's id."""
    rank = os.environ["RANK"]
    if os.environ.get(_NAMESPACE_ENV) != rank:
        os.environ[_NAMESPACE_ENV] = rank
        argv = ["unshare", "--mount", "--propagation", "private", sys.executable, os.path.abspath(sys.argv[0]),
                *sys.argv[1:]]
        os.execvp(argv[0], argv)  # does not return
    subprocess.run(["mount", "--bind", str(work / f"rank{rank}-disk"), str(work / "scratch")], check=True)
    return (work / "scratch" / ".disk-id").read_text()


def main() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("work")
    p.add_argument("arch")
    p.add_argument("--max-shard-size", default="200KB")
    args = p.parse_args()
    work = Path(args.work).absolute()
    disk_id = enter_node_local_disk(work)

    # Heavy imports only once inside the namespace (the re-exec above replaces this process).
    import torch
    import torch.distributed as dist
    from export_common import finish, input_ids, sharded_lora_model, write_result

    from lora_dist.export import ExportError, export_merged, layout, writer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {"disk_id": disk_id}

    model, _ = sharded_lora_model(args.base, args.arch, work / "adapter")
    with torch.no_grad():
        model(input_ids())  # the model has been used, as after training

    # Record, do not change, what the export decides and writes.
    seen: list[bool] = []
    chosen: list[bool] = []
    written: list[int] = []
    real_sees, real_choose, real_pwrite = writer.sees_probe, writer.choose_gather, layout.pwrite_tensor

    def sees_probe(*a, **k):
        seen.append(real_sees(*a, **k))
        return seen[-1]

    def choose_gather(*a, **k):
        chosen.append(real_choose(*a, **k))
        return chosen[-1]

    def pwrite(fd, tensor, offset):
        written.append(tensor.numel() * tensor.element_size())
        real_pwrite(fd, tensor, offset)

    writer.sees_probe, writer.choose_gather, layout.pwrite_tensor = sees_probe, choose_gather, pwrite

    scratch = work / "scratch"
    try:
        export_merged(model, scratch / "merged_shared", args.base, dtype=torch.float32,
                      max_shard_size=args.max_shard_size, mode="shared")
        result["shared_raised"] = None
    except ExportError as e:
        result["shared_raised"] = str(e)
    result["shared_seen"] = list(seen)

    seen.clear()
    written.clear()
    out = export_merged(model, scratch / "merged", args.base, dtype=torch.float32,
                        max_shard_size=args.max_shard_size)  # mode="auto"
    result.update(
        auto_seen=list(seen), auto_gather=list(chosen), auto_written=sum(written), out=str(out),
        out_exists_here=out.is_dir(), scratch_here=sorted(os.listdir(scratch)),
    )
    write_result(work / f"result_{rank}.json", result)
    dist.barrier()
    finish()


if __name__ == "__main__":
    main()
