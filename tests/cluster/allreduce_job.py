"""Stand-in for ``lora-dist train`` in the cluster tests.

Takes the same command line (``CONFIG [key.path=value ...]``; the config is
not read) and does what matters to the launch path: joins one gloo world from
torchrun's or Slurm's environment, all-reduces ``rank + 1`` and writes what
it saw to ``<output.dir>/rank<R>.json`` for the test to check.

With ``standin.steps=N`` it runs N steps of ``standin.step_seconds`` each
(``standin.restart_step_seconds`` after a Slurm requeue) and
behaves like a preemptible trainer: SIGUSR1/SIGTERM set a flag, the ranks
agree on it at the next step boundary (all-reduce), rank 0 writes
``<output.dir>/checkpoint.json`` and every rank exits with
``$PREEMPT_EXIT_CODE`` (default 99). ``checkpoint.resume=auto`` resumes from
that checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time


def parse_overrides(argv: list[str]) -> dict[str, str]:
    if not argv:
        sys.exit("usage: allreduce_job.py CONFIG [key.path=value ...]")
    overrides = {}
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"override without '=': {item!r}")
        overrides[key] = value
    return overrides


def rendezvous_env() -> tuple[int, int, int, int]:
    """rank, world size, local rank, node rank: torchrun's variables, else Slurm's."""
    if "RANK" in os.environ:
        env = os.environ
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), int(env.get("GROUP_RANK", 0))
    env = os.environ
    rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    return rank, world, int(env["SLURM_LOCALID"]), int(env["SLURM_NODEID"])


def main() -> int:
    overrides = parse_overrides(sys.argv[1:])
    out_dir = overrides["output.dir"]
    steps = int(overrides.get("standin.steps", "1"))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    step_seconds = float(overrides.get("standin.step_seconds", "0"))
    if restart:
        step_seconds = float(overrides.get("standin.restart_step_seconds", step_seconds))
    resume = overrides.get("checkpoint.resume", "none") == "auto"
    preempt_exit_code = int(os.environ.get("PREEMPT_EXIT_CODE", "99"))

    stop_requested = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))

    import torch
    import torch.distributed as dist

    rank, world, local_rank, node_rank = rendezvous_env()
    os.makedirs(out_dir, exist_ok=True)
    dist.init_process_group("gloo")

    checkpoint = os.path.join(out_dir, "checkpoint.json")
    start_step = 0
    if resume and os.path.exists(checkpoint):
        with open(checkpoint) as f:
            start_step = json.load(f)["step"]
    open(os.path.join(out_dir, f"started-rank{rank}-run{restart}"), "w").close()

    total = torch.zeros(1)
    for step in range(start_step, steps):
        time.sleep(step_seconds)
        # Step boundary: [rank + 1, stop flag]; any rank's flag stops all.
        t = torch.tensor([float(rank + 1), float(bool(stop_requested))])
        dist.all_reduce(t)
        total = t[:1]
        if t[1] > 0:
            if rank == 0:
                with open(checkpoint + ".tmp", "w") as f:
                    json.dump({"step": step + 1}, f)
                os.replace(checkpoint + ".tmp", checkpoint)
            dist.barrier()
            dist.destroy_process_group()
            print(f"rank {rank}: stopped at step {step + 1}, exit {preempt_exit_code}", flush=True)
            # Real ranks leave a moment apart; make sure the launcher copes.
            time.sleep(0.25 * rank)
            return preempt_exit_code

    result = {
        "rank": rank,
        "world_size": world,
        "local_rank": local_rank,
        "node_rank": node_rank,
        "allreduce": total.item(),
        "start_step": start_step,
        "restart": restart,
        "net_namespace": os.readlink("/proc/self/ns/net"),
        "socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "hostname": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
