"""Helpers for the cluster tests: what the jobs run, and submitting/waiting on them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "slurm" / "local_cluster.sh"
SLURM_DIR = REPO / "slurm"
STANDIN = Path(__file__).resolve().parent / "allreduce_job.py"
VENV_BIN = Path(sys.executable).parent
NODE_NETNS = {"n1": "ldn1", "n2": "ldn2"}
NODE_ADDR = {"n1": "10.77.0.11", "n2": "10.77.0.12"}
NODE_IFNAME = {"n1": "ld-veth1p", "n2": "ld-veth2p"}
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


# ----------------------------------------------------------------- commands


@dataclass(frozen=True)
class TrainCommand:
    """What the cluster jobs run, and how a test knows it worked.

    ``argv`` becomes the sbatch templates' TRAIN_CMD (split on whitespace, so
    no spaces inside words); ``args(out_dir)`` are the script's arguments:
    the config, then dotted overrides.
    """

    name: str
    argv: tuple[str, ...]
    config: str
    #: check(out_dir, world_size): the run finished and wrote what it should.
    check: Callable[[Path, int], None]
    #: is_stepping(out_dir): training steps have begun (time to preempt it).
    is_stepping: Callable[[Path], bool]
    #: check_resumed(out_dir, log_text) -> the step the rerun resumed from.
    check_resumed: Callable[[Path, str], int]
    extra_overrides: tuple[str, ...] = field(default=())
    #: Overrides for the preemption test: long enough to be signalled mid-run.
    preempt_overrides: tuple[str, ...] = field(default=())

    def args(self, out_dir: Path, *overrides: str) -> list[str]:
        return [self.config, f"output.dir={out_dir}", *self.extra_overrides, *overrides]


def read_rank_results(out_dir: Path, world_size: int) -> list[dict]:
    files = sorted(out_dir.glob("rank*.json"))
    assert [f.name for f in files] == sorted(f"rank{r}.json" for r in range(world_size)), (
        f"expected one result per rank in {out_dir}, found {[f.name for f in files]}"
    )
    return [json.loads(f.read_text()) for f in files]


def check_standin(out_dir: Path, world_size: int) -> None:
    """Every rank joined one world and the all-reduce of rank+1 summed correctly."""
    results = read_rank_results(out_dir, world_size)
    expected = world_size * (world_size + 1) / 2
    for r in results:
        assert r["world_size"] == world_size
        assert r["allreduce"] == expected, f"rank {r['rank']}: all-reduce gave {r['allreduce']}, expected {expected}"
    assert sorted(r["rank"] for r in results) == list(range(world_size))


def standin_resumed(out_dir: Path, log_text: str) -> int:
    """Rank 0 saved the step it stopped at; every rank of the rerun started there."""
    saved_step = json.loads((out_dir / "checkpoint.json").read_text())["step"]
    results = [json.loads(f.read_text()) for f in out_dir.glob("rank*.json")]
    assert {(r["restart"], r["start_step"]) for r in results} == {(1, saved_step)}
    assert sorted(p.name for p in out_dir.glob("started-rank0-run*")) == ["started-rank0-run0", "started-rank0-run1"]
    return saved_step


def check_lora_dist(base: Path, data: Path, out_dir: Path, world_size: int) -> None:
    """The job wrote an adapter equal to one process's on the same global batch, and a merged
    export that verifies against base + adapter."""
    import torch
    from safetensors.torch import load_file

    from lora_dist.config import load_config
    from lora_dist.export import verify_checkpoint

    adapter = out_dir / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file() and adapter.stat().st_size > 0, f"no adapter at {adapter}"
    run_cfg = json.loads((out_dir / "config.json").read_text())
    mbs = run_cfg["train"]["micro_batch_size"]
    reference = out_dir.parent / f"{out_dir.name}-single-process-reference"
    overrides = [f"{section}.{key}={json.dumps(value)}" for section, values in run_cfg.items()
                 for key, value in values.items() if value is not None and section != "output"
                 and not isinstance(value, (dict, list))]
    overrides += [f"lora.target_modules={json.dumps(run_cfg['lora']['target_modules'])}",
                  "parallel.strategy=none", f"train.micro_batch_size={mbs * world_size}", "export.merged=false",
                  f"output.dir={reference}", "checkpoint.every=0"]
    load_config(None, overrides)  # fail here, not in the subprocess, on a bad override
    subprocess.run([str(VENV_BIN / "lora-dist"), "train", *overrides], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    ref = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(adapter))
    assert set(ref) == set(got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0, msg=lambda m: f"{key}: {m}")
    assert max(float(t.abs().max()) for k, t in got.items() if "lora_B" in k) > 0, "the adapter never trained"
    if run_cfg["export"]["merged"]:
        assert (out_dir / "merged" / "model.safetensors.index.json").is_file(), f"no merged export in {out_dir}"
        verify_checkpoint(out_dir / "merged", base_dir=base, adapter_dir=out_dir / "adapter", sample=None)


def lora_dist_resumed(out_dir: Path, log_text: str) -> int:
    match = re.search(r"resumed from \S+ at step (\d+)", log_text)
    assert match, "the rerun did not log a resume"
    return int(match.group(1))


def train_command_from_env(work_dir: Path) -> TrainCommand:
    """The stand-in, or with LORA_DIST_CLUSTER_TRAIN=lora-dist the real trainer on a
    tiny Llama and demo data built under ``work_dir`` (shared by both nodes)."""
    choice = os.environ.get("LORA_DIST_CLUSTER_TRAIN", "lora-dist")
    if choice == "standin":
        return TrainCommand(
            "standin",
            (sys.executable, str(STANDIN)),
            "configs/demo.yaml",
            check_standin,
            is_stepping=lambda out: len(list(out.glob("started-rank*-run0"))) == 4,
            check_resumed=standin_resumed,
            # 100 steps x 0.5 s outlast the signal; the rerun steps quickly.
            preempt_overrides=("standin.steps=100", "standin.step_seconds=0.5", "standin.restart_step_seconds=0.02"),
        )
    if choice == "lora-dist":
        from lora_dist.demo import make_tiny_checkpoint, write_demo_data

        base = make_tiny_checkpoint(work_dir / "base", arch="llama", hidden=64, layers=2, heads=4)
        data = write_demo_data(work_dir / "data.jsonl", n=200)
        return TrainCommand(
            "lora-dist",
            (str(VENV_BIN / "lora-dist"), "train"),
            str(REPO / "configs" / "demo.yaml"),
            lambda out, world: check_lora_dist(base, data, out, world),
            is_stepping=lambda out: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0,
            check_resumed=lora_dist_resumed,
            extra_overrides=(f"model.path={base}", f"data.path={data}", "train.steps=4", "export.merged=true",
                             "export.dtype=float32", "train.eval_every=0", "data.eval_fraction=0"),
            preempt_overrides=("train.steps=40", "train.log_every=1"),
        )
    raise pytest.UsageError(f"LORA_DIST_CLUSTER_TRAIN must be 'standin' or 'lora-dist', got {choice!r}")


# ----------------------------------------------------------------- jobs


def harness(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(HARNESS), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )




def job_env(train_cmd: tuple[str, ...] | None = None, **extra: str) -> dict[str, str]:
    """Environment for sbatch/torchrun: this venv first on PATH, no Slurm variables
    inherited from an outer job, the stand-in's or lora-dist's command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    if train_cmd is not None:
        env["TRAIN_CMD"] = " ".join(train_cmd)
    env.update(extra)
    return env


def sbatch(script: Path, args: list[str], options: list[str], cwd: Path, env: dict[str, str]) -> str:
    (cwd / "logs").mkdir(exist_ok=True)
    proc = subprocess.run(
        ["sbatch", "--parsable", *options, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (accounting is off, so no sacct)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    info = {}
    for item in out.split():
        key, sep, value = item.partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def wait_for_job(
    job_id: str,
    timeout: float,
    log: Path | None = None,
    on_poll: Callable[[dict[str, str]], None] | None = None,
) -> dict[str, str]:
    """Poll until the job reaches a terminal state; cancel it and fail on timeout."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in TERMINAL_STATES:
            return info
        if on_poll is not None:
            on_poll(info)
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} not finished after {timeout}s (state {info.get('JobState')}){log_tail(log)}")


def log_tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    return f"\n---- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def assert_one_rank_pair_per_namespace(results: list[dict], node_key: str, nodes: tuple) -> None:
    """Stand-in results: ranks 0-1 ran on ``nodes[0]``, 2-3 on ``nodes[1]``, each
    node in its own network namespace and talking through its own veth."""
    seen = {}
    for r in results:
        netns, ifnames, ranks = seen.setdefault(r[node_key], (set(), set(), []))
        netns.add(r["net_namespace"])
        ifnames.add(r["socket_ifname"])
        ranks.append(r["rank"])
    assert sorted(seen) == sorted(nodes), f"ranks ran on {sorted(seen)}, expected {nodes}"
    (netns0, ifnames0, ranks0), (netns1, ifnames1, ranks1) = seen[nodes[0]], seen[nodes[1]]
    assert (sorted(ranks0), sorted(ranks1)) == ([0, 1], [2, 3])
    assert len(netns0) == len(netns1) == 1 and netns0 != netns1, "the nodes did not run in separate namespaces"
    assert (ifnames0, ifnames1) == ({NODE_IFNAME["n1"]}, {NODE_IFNAME["n2"]})
