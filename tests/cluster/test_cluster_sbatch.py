"""The sbatch templates and `lora-dist slurm`, submitted to the two-node local cluster.

Each "node" has two fake GPUs (count-only GRES) and two CPUs, so the templates
run with the same options as on a GPU cluster, except that the CPUs the
templates ask per task (sized for 8-GPU nodes) are lowered to fit; the workers
use CPU and gloo.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cluster_jobs import (
    SLURM_DIR,
    assert_one_rank_pair_per_namespace,
    job_env,
    log_tail,
    read_rank_results,
    sbatch,
    wait_for_job,
)

from lora_dist.cli import main

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("local_cluster")]

TWO_NODES_TWO_GPUS = ["--nodes=2", "--gpus-per-node=2"]
# Two CPUs per node: single_node.sbatch asks 32 for its torchrun task, the
# per-GPU templates 4 per task.
ONE_TASK_TWO_CPUS = ["--cpus-per-task=2"]
TWO_TASKS_ONE_CPU_EACH = ["--ntasks-per-node=2", "--cpus-per-task=1"]


def assert_completed(info: dict[str, str], log: Path) -> None:
    assert info["JobState"] == "COMPLETED", (
        f"job {info.get('JobId')}: {info['JobState']} exit {info.get('ExitCode')}{log_tail(log)}"
    )


def test_single_node_sbatch_runs_one_worker_per_gpu(tmp_path, train_command):
    out = tmp_path / "out"
    env = job_env(train_command.argv)
    options = ["--gpus-per-node=2", *ONE_TASK_TWO_CPUS]
    job = sbatch(SLURM_DIR / "single_node.sbatch", train_command.args(out), options, tmp_path, env)
    log = tmp_path / "logs" / f"lora-dist-{job}.out"

    info = wait_for_job(job, 300, log)

    assert_completed(info, log)
    train_command.check(out, 2)


def test_multi_node_sbatch_trains_across_two_nodes(tmp_path, train_command):
    out = tmp_path / "out"
    env = job_env(train_command.argv, SOCKET_IFNAME="auto")
    job = sbatch(SLURM_DIR / "multi_node.sbatch", train_command.args(out), TWO_NODES_TWO_GPUS, tmp_path, env)
    log = tmp_path / "logs" / f"lora-dist-{job}.out"

    info = wait_for_job(job, 300, log)

    assert_completed(info, log)
    assert info["NodeList"] == "n[1-2]"
    text = log.read_text()
    assert "rendezvous 10.77.0.11:" in text
    # The whole node for each torchrun (--exclusive), one thread per worker.
    assert "2 CPUs per node, OMP_NUM_THREADS=1" in text
    # No fast network on the local cluster: auto falls back to the route to the first node.
    assert "n1: SOCKET_IFNAME=auto -> ld-veth1p" in text and "n2: SOCKET_IFNAME=auto -> ld-veth2p" in text
    train_command.check(out, 4)
    if train_command.name == "standin":
        assert_one_rank_pair_per_namespace(read_rank_results(out, 4), "slurm_node", ("n1", "n2"))


def test_per_gpu_tasks_sbatch_runs_one_task_per_gpu(tmp_path, train_command):
    out = tmp_path / "out"
    env = job_env(train_command.argv, SOCKET_IFNAME="auto")
    options = [*TWO_NODES_TWO_GPUS, *TWO_TASKS_ONE_CPU_EACH]
    job = sbatch(SLURM_DIR / "per_gpu_tasks.sbatch", train_command.args(out), options, tmp_path, env)
    log = tmp_path / "logs" / f"lora-dist-{job}.out"

    info = wait_for_job(job, 300, log)

    assert_completed(info, log)
    train_command.check(out, 4)
    if train_command.name == "standin":
        assert_one_rank_pair_per_namespace(read_rank_results(out, 4), "slurm_node", ("n1", "n2"))


def test_preemptible_sbatch_checkpoints_requeues_and_resumes(tmp_path, train_command):
    """Once training is stepping, the job's steps get SIGUSR1, as --signal=USR1@120
    delivers it before the time limit (`scancel --signal` takes the same path
    without waiting for slurmctld's once-a-minute check). The trainer saves at
    the next step and exits 99, the script requeues, the rerun resumes."""
    out = tmp_path / "out"
    env = job_env(train_command.argv, SOCKET_IFNAME="auto")
    args = train_command.args(out, *train_command.preempt_overrides)
    options = [*TWO_NODES_TWO_GPUS, *TWO_TASKS_ONE_CPU_EACH]
    job = sbatch(SLURM_DIR / "preemptible.sbatch", args, options, tmp_path, env)
    log = tmp_path / "logs" / f"lora-dist-{job}.out"
    signalled = []

    def preempt_once_stepping(info: dict[str, str]) -> None:
        if not signalled and info.get("JobState") == "RUNNING" and train_command.is_stepping(out):
            subprocess.run(["scancel", "--signal=USR1", job], check=True)
            signalled.append(True)

    # The requeued job is held for cred_expire + 1 s (10 s on the local
    # cluster, 120 s by default) before it starts again.
    info = wait_for_job(job, 420, log, on_poll=preempt_once_stepping)

    assert_completed(info, log)
    assert info["Restarts"] == "1", f"expected one requeue{log_tail(log)}"
    text = log.read_text()
    # --open-mode=append: both runs in one log.
    assert f"job {job} run 0" in text and f"job {job} run 1" in text
    assert "requeueing job" in text
    train_command.check(out, 4)
    assert train_command.check_resumed(out, text) > 0


def test_lora_dist_slurm_renders_and_submits(tmp_path, train_command, monkeypatch, capsys):
    config = Path(train_command.config).resolve()
    if train_command.name == "standin":  # it ignores its config; `lora-dist slurm` wants a file
        config = tmp_path / "demo.yaml"
        config.write_text("# placeholder: the stand-in does not read its config\n")
    out = tmp_path / "out"
    for key, value in job_env(train_command.argv, SOCKET_IFNAME="auto").items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    argv = ["slurm", str(config), "--nodes", "2", "--gpus-per-node", "2", "--time", "10", "--job-name", "ld-cli",
            "--output-dir", str(tmp_path / "runs"), "--", f"output.dir={out}",
            *train_command.extra_overrides]  # fmt: skip

    assert main(argv) == 0
    submitted = capsys.readouterr().out
    job = re.search(r"submitted job (\d+)", submitted).group(1)
    log = tmp_path / "runs" / "logs" / f"ld-cli-{job}.out"

    info = wait_for_job(job, 300, log)

    assert_completed(info, log)
    assert info["NodeList"] == "n[1-2]"
    assert len(list((tmp_path / "runs").glob("ld-cli-*.sbatch"))) == 1
    train_command.check(out, 4)
