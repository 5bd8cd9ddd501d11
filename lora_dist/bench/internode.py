"""Inter-node bytes per training step: hybrid sharding against full fsdp2 and PEFT + accelerate FSDP2.

    python -m lora_dist.bench.internode --run [--quick | --size NAME] [--out bench/results/internode.json]   (driver)
    python -m lora_dist.bench.internode JOB.json                                                (every rank)

The driver runs from a checkout, as root, on the two-node Slurm cluster the tests build on one machine
(``slurm/local_cluster.sh``: each node a network namespace whose one link is its veth). It submits one job,
``slurm/multi_node.sbatch`` on 2 nodes x 2 ranks, whose ranks run the configurations one after another in
the same world of 4 ranks, on the same data: ``lora_dist_hybrid`` (``parallel.dp_replicate`` = the nodes,
``dp_shard`` = the ranks of a node), ``lora_dist_fsdp2`` (the base sharded over all ranks),
``lora_dist_fsdp2_reshard_node`` (the same, ``parallel.reshard_after_forward=node``) and the anchor
``peft_accelerate_fsdp2`` (:mod:`lora_dist.bench.systems`, PEFT's documented accelerate FSDP2 recipe).

How bytes are counted: each node's first rank reads the receive and transmit byte counters of the interface
the collectives use (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``) from ``/proc/net/dev``, which shows the
rank's own network namespace, between two barriers around the measured steps; traffic between the ranks of a
node goes over loopback and is not on it. The bytes that crossed between nodes are the sum of the nodes'
transmitted bytes (each crossing byte leaves exactly one node), Ethernet, IP and TCP headers included. On the
local cluster nothing else uses the veths, so the count is exact; on a real cluster the same counters also
hold whatever else the NIC carries. NCCL over InfiniBand/RoCE bypasses these counters: this measures
socket transports (gloo, NCCL's socket transport).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["CONFIGS", "GroupCounter", "interface_bytes", "main"]

#: The configurations, in the order every rank runs them (the anchor last: accelerate sets process-wide state).
CONFIGS = ("lora_dist_hybrid", "lora_dist_fsdp2", "lora_dist_fsdp2_reshard_node", "peft_accelerate_fsdp2")
ANCHOR = "peft_accelerate_fsdp2"


def interface_bytes(ifname: str, proc_net_dev: str = "/proc/net/dev") -> tuple[int, int]:
    """``(received, transmitted)`` bytes of ``ifname`` in this process's network namespace.

    Raises:
        KeyError: no such interface here.
    """
    with open(proc_net_dev) as f:
        for line in f.readlines()[2:]:
            name, _, fields = line.partition(":")
            if name.strip() == ifname:
                values = fields.split()
                return int(values[0]), int(values[8])
    raise KeyError(f"interface {ifname!r} is not in {proc_net_dev} of this network namespace")


#: torch.distributed's collectives that move tensors during a step: name -> the position of the argument that is
#: the payload, the whole tensor (an all-gather's output, a reduce-scatter's input) as torch's own accounting counts
#: it. Arguments are matched to the function's parameters by name too: FSDP2 passes them as keywords.
_COLLECTIVES = {"all_reduce": 0, "broadcast": 0, "all_gather_single": 0, "all_gather_into_tensor": 0,
                "reduce_scatter_single": 1, "reduce_scatter_tensor": 1}


class GroupCounter:
    """Collective payload bytes by process group while active, marking the groups that span nodes.

    The cross-check of the interface counters: which collectives could cross, by how much. It wraps the
    public ``torch.distributed`` functions FSDP2, lora_dist and accelerate call (``dist.all_gather_single`` ...),
    not the library-internal calls between them, so nothing is counted twice.

    Args:
        local_world_size: ranks per node (ranks numbered node by node).
    """

    def __init__(self, local_world_size: int) -> None:
        self.local = local_world_size
        self.groups: dict[tuple[int, ...], dict] = {}
        self._saved: dict = {}

    def __enter__(self) -> "GroupCounter":
        import torch.distributed as dist

        for name, payload in _COLLECTIVES.items():
            real = getattr(dist, name, None)
            if real is None:  # a torch without this name
                continue
            self._saved[name] = real
            signature = inspect.signature(real)
            payload_name = list(signature.parameters)[payload]

            def counted(*args, _real=real, _name=name, _signature=signature, _payload=payload_name, **kwargs):
                given = _signature.bind(*args, **kwargs).arguments
                self._record(_name, given.get("group"), given.get(_payload))
                return _real(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, real in self._saved.items():
            setattr(dist, name, real)

    def _record(self, name: str, group, tensor) -> None:
        import torch.distributed as dist

        ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
        spans = len({r // self.local for r in ranks}) > 1
        entry = self.groups.setdefault(ranks, {"ranks": list(ranks), "spans_nodes": spans, "calls": {},
                                               "payload_bytes": 0, "call_payload_bytes": {}})
        entry["calls"][name] = entry["calls"].get(name, 0) + 1
        if tensor is not None:
            nbytes = tensor.numel() * tensor.element_size()
            entry["payload_bytes"] += nbytes
            entry["call_payload_bytes"][name] = entry["call_payload_bytes"].get(name, 0) + nbytes

    def as_list(self, steps: int) -> list[dict]:
        """Per group, per step: the payload in all and by collective (FSDP2's base gathers and lora_dist's gather of
        the LoRA update are both ``all_gather_single``: their bytes tell them apart)."""
        return [{**g, "payload_bytes_per_step": g["payload_bytes"] / steps,
                 "call_payload_bytes_per_step": {k: v / steps for k, v in g["call_payload_bytes"].items()}}
                for g in self.groups.values()]


def _system(name: str, settings, device, num_nodes: int, local: int):
    from lora_dist.bench.systems import LoraDist, make_system

    if name == "lora_dist_hybrid":
        return LoraDist(settings, device, "fsdp2", (f"parallel.dp_replicate={num_nodes}", f"parallel.dp_shard={local}"),
                        name)
    # The full-sharding runs say so: on several nodes fsdp2 would choose hybrid sharding by itself.
    if name == "lora_dist_fsdp2_reshard_node":
        return LoraDist(settings, device, "fsdp2", ("parallel.dp_replicate=1", "parallel.reshard_after_forward=node"),
                        name)
    if name == "lora_dist_fsdp2":
        return LoraDist(settings, device, "fsdp2", ("parallel.dp_replicate=1",), name)
    return make_system(name, settings, device)


def worker(job_path: str) -> None:
    """Every rank: each configuration's warm-up steps, then its measured steps between counter reads."""
    import torch.distributed as dist
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    from lora_dist.bench.measure import LiveTensorBytes
    from lora_dist.bench.systems import BenchSettings
    from lora_dist.data import load_dataset
    from lora_dist.launch import exit_distributed, init_distributed, run_device

    job = json.loads(Path(job_path).read_text())
    env = init_distributed(timeout_s=1800)
    device = run_device()
    ifname = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME") or ""
    settings = BenchSettings(**job["settings"])
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    data = load_dataset(settings.data_path, tokenizer, settings.seq_len, None)
    global_micro = settings.micro_batch * env.world_size

    def batch(k: int, system):  # as the system's own loop hands it to a step (System.prepare)
        ids, labels = data.batch(k * global_micro + env.rank * settings.micro_batch, settings.micro_batch,
                                 settings.seed)
        return system.prepare(ids, labels)

    def per_node(before: tuple[int, int], after: tuple[int, int]) -> list[dict]:
        """Every node's (its local rank 0's) received and transmitted bytes over the span, gathered."""
        mine = {"node": env.node_rank, "rx_bytes": after[0] - before[0], "tx_bytes": after[1] - before[1]}
        gathered: list = [None] * env.world_size
        dist.all_gather_object(gathered, mine if env.local_rank == 0 else None)
        return sorted((g for g in gathered if g is not None), key=lambda g: g["node"])

    results = []
    for name in job["configs"]:
        system = _system(name, settings, device, env.num_nodes, env.local_world_size)
        system.setup()
        step = 0
        for _ in range(job["warmup_steps"]):
            system.train_step(batch(step, system))
            step += 1
        inputs = [batch(step + k, system) for k in range(job["steps"])]
        dist.barrier()
        before = interface_bytes(ifname)  # the span counted: these steps and one barrier
        t0 = time.perf_counter()
        for prepared in inputs:
            system.train_step(prepared)
        dist.barrier()
        seconds = time.perf_counter() - t0
        nodes = per_node(before, interface_bytes(ifname))
        crossed = sum(n["tx_bytes"] for n in nodes)
        # One more step, its collectives counted by process group on this rank (rank 0's are reported).
        with GroupCounter(env.local_world_size) as groups:
            system.train_step(batch(step + job["steps"], system))
        dist.barrier()
        record = {
            "config": name, "description": system.description, "params": system.param_counts(),
            "steps": job["steps"], "nodes": nodes, "internode_bytes": crossed,
            "internode_bytes_per_step": crossed / job["steps"], "seconds_per_step": seconds / job["steps"],
            "rank0_collectives_by_group": groups.as_list(1), "notes": system.notes,
        }
        if device.type == "cpu":  # one more step, its live tensor bytes counted on every rank (as lora-dist bench)
            prepared = batch(step + job["steps"] + 1, system)
            tracker = LiveTensorBytes("cpu")
            with tracker:
                system.train_step(prepared)
            peaks: list = [None] * env.world_size
            dist.all_gather_object(peaks, tracker.peak)
            record["tensor_peak"] = max(peaks)
            if hasattr(system, "plan"):
                record["planned_peak"] = system.plan()["total"]
        results.append(record)
        del system
        gc.collect()
        dist.barrier()
    if env.rank == 0:
        out = Path(job["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"world_size": env.world_size, "num_nodes": env.num_nodes,
                                   "local_world_size": env.local_world_size, "interface": ifname,
                                   "settings": job["settings"], "results": results}, indent=1))
    dist.barrier()
    exit_distributed()  # no interpreter teardown: it can abort a finished rank (see exit_distributed)


# ----------------------------------------------------------------------------- the driver (local cluster)


def _wait(job_id: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        info = dict(item.partition("=")[::2] for item in text.split() if "=" in item)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(2)
    subprocess.run(["scancel", job_id])
    raise SystemExit(f"internode: job {job_id} not done after {timeout:.0f} s (state {info.get('JobState')})")


def submit(job: dict, work: Path, timeout: float = 1800.0, python: str = sys.executable,
           script: Path = Path("slurm/multi_node.sbatch")) -> dict:
    """Run ``job`` with ``script`` (a checkout's ``slurm/multi_node.sbatch``) on 2 nodes x 2 ranks of the running
    local cluster; the rank-0 result. The job file and the log are kept in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(TRAIN_CMD=f"{python} -m lora_dist.bench.internode", SOCKET_IFNAME="auto", PYTHONUNBUFFERED="1",
               PATH=f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}")
    (work / "logs").mkdir(exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=2",
                           str(Path(script).resolve()), str(work / "job.json")],
                          cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"internode: sbatch failed: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    info = _wait(job_id, timeout)
    log = work / "logs" / f"lora-dist-{job_id}.out"
    if info.get("JobState") != "COMPLETED":
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
        raise SystemExit(f"internode: job {job_id} {info.get('JobState')}\n{tail}")
    return json.loads(Path(job["out"]).read_text())


def table(result: dict) -> str:
    """The markdown table of a result: bytes per step, and relative to the anchor and to full fsdp2."""
    by = {r["config"]: r for r in result["results"]}
    anchor = by.get(ANCHOR, {}).get("internode_bytes_per_step")
    fsdp2 = by.get("lora_dist_fsdp2", {}).get("internode_bytes_per_step")
    lines = ["| configuration | inter-node bytes / step | vs anchor | vs full fsdp2 | rank 0's collective payload / "
             "step: groups spanning nodes / within a node | s / step | tensors / rank: measured, planned |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        b = r["internode_bytes_per_step"]
        rel = lambda x: f"{b / x:.4f}x" if x else "-"  # noqa: E731
        groups = r.get("rank0_collectives_by_group", [])
        spanning = sum(g["payload_bytes_per_step"] for g in groups if g["spans_nodes"])
        local = sum(g["payload_bytes_per_step"] for g in groups if not g["spans_nodes"])
        lines.append(f"| {r['config']} | {b / 1e6:,.3f} MB | {rel(anchor)} | {rel(fsdp2)} | {spanning / 1e6:,.3f} MB / "
                     f"{local / 1e6:,.3f} MB | {r['seconds_per_step']:.2f} | {_tensors(r)} |")
    return "\n".join(lines)


def _tensors(r: dict) -> str:
    """The peak live tensor bytes of a step (the largest rank's), and the planner's prediction with its error."""
    if "tensor_peak" not in r:
        return "-"
    measured = f"{r['tensor_peak'] / 1e9:.3f} GB"
    if "planned_peak" not in r:
        return measured
    return f"{measured}, {r['planned_peak'] / 1e9:.3f} GB ({r['planned_peak'] / r['tensor_peak'] - 1:+.1%})"


def run(quick: bool, out: Path, work: Path, steps: int, size: str | None = None) -> dict:
    """Build the model and data, bring the local cluster up (held under the tests' lock), measure, write ``out``."""
    import fcntl

    from lora_dist.bench.measure import machine_info
    from lora_dist.bench.models import FULL_SIZES, QUICK_SIZES, build_checkpoint, write_data
    from lora_dist.bench.systems import BenchSettings

    pool = QUICK_SIZES if quick else FULL_SIZES
    spec = next((s for s in pool if s.name == size), None) if size else pool[0]
    if spec is None:
        raise SystemExit(f"internode: unknown size {size!r}; choose from {[s.name for s in pool]}")
    model = build_checkpoint(spec, work / "models")
    data = write_data(work / "data.jsonl")
    settings = BenchSettings(str(model), str(data), seq_len=128, micro_batch=1, lora_r=16)
    job = {"configs": list(CONFIGS), "settings": vars(settings), "warmup_steps": 1, "steps": steps,
           "out": str(work / "result.json")}
    harness = ["bash", "slurm/local_cluster.sh"]
    with open("/run/lora-dist-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the cluster tests hold it for their whole session
        was_up = subprocess.run([*harness, "status"], capture_output=True).returncode == 0
        up = subprocess.run([*harness, "up"], capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"internode: slurm/local_cluster.sh up failed:\n{up.stderr}")
        try:
            result = submit(job, work)
        finally:
            if not was_up:
                subprocess.run([*harness, "down"], capture_output=True)
    result.update(model=spec.name, model_params=spec.num_params(), machine=machine_info(),
                  how="2 nodes (network namespaces of the local Slurm cluster) x 2 ranks, gloo on CPU, "
                      "slurm/multi_node.sbatch; bytes from the nodes' veth counters")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-"):
        worker(argv[0])
        return
    parser = argparse.ArgumentParser(prog="python -m lora_dist.bench.internode", description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="measure on the local two-node cluster (root, a checkout)")
    parser.add_argument("--quick", action="store_true", help="the smoke-test model size")
    parser.add_argument("--size", help="a benchmark model size (default: the first, llama-112m)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    parser.add_argument("--out", default="bench/results/internode.json")
    parser.add_argument("--work-dir", default="/tmp/lora_dist_internode")
    args = parser.parse_args(argv)
    if not args.run:
        parser.error("pass --run (or a JOB.json, as the ranks do)")
    result = run(args.quick, Path(args.out), Path(args.work_dir), args.steps, args.size)
    print(table(result))


if __name__ == "__main__":
    main()
