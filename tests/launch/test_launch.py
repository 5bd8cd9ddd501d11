"""Tests for lora_dist.launch: launcher detection (pure), hostlists, and real process-group init.

Detection is tested with plain dicts. ``init_distributed`` is tested in this
process for the single-process and failure paths, and with real 2-process
runs under torchrun, MPICH ``mpiexec`` and a hand-made ``srun`` environment,
each checking an all_reduce result.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distutil import lora_dist

from lora_dist import launch as env_mod
from lora_dist.launch.detect import loopback_address
from lora_dist.launch.distributed import free_port
from lora_dist.launch import LaunchEnv, LaunchError, detect_launch_env, expand_hostlist

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

LAUNCHER_VAR_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_", "GROUP_", "ROLE_",
                         "CROSS_")
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "NODE_RANK"}

WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from lora_dist.launch import destroy_distributed, init_distributed

for name in sys.argv[1:]:
    os.environ.pop(name, None)
launch = init_distributed(timeout_s=60)
value = torch.tensor([float(launch.rank + 1), 10.0 ** launch.rank])
dist.all_reduce(value)
result = dict(launch.__dict__, sum=value.tolist(), backend=dist.get_backend(), pg_rank=dist.get_rank(),
              pg_world=dist.get_world_size(), exported_rank=os.environ["RANK"],
              exported_local_rank=os.environ["LOCAL_RANK"])
os.write(1, ("RESULT " + json.dumps(result) + "\n").encode())
destroy_distributed()
"""


def _is_launcher_var(name: str) -> bool:
    return name in LAUNCHER_VARS or name.startswith(LAUNCHER_VAR_PREFIXES)


@pytest.fixture
def clean_environ():
    """os.environ without launcher variables; restored (and dist torn down) afterwards."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if _is_launcher_var(name):
            del os.environ[name]
    try:
        yield os.environ
    finally:
        env_mod.destroy_distributed()
        os.environ.clear()
        os.environ.update(saved)


def _free_port(low: int = 0, high: int = 0) -> int:
    if not low:
        return free_port()
    for port in range(low, high):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _child_environ(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not _is_launcher_var(k)}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    environ["OMP_NUM_THREADS"] = "1"
    environ["PATH"] = os.pathsep.join([str(VENV_BIN), environ.get("PATH", "")])
    environ.update(extra)
    return environ


def _results(stdout: str) -> list[dict]:
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines() if "RESULT " in line]
    return sorted(rows, key=lambda row: row["rank"])


def _assert_all_reduced(rows: list[dict], world_size: int, launcher: str) -> None:
    assert [row["rank"] for row in rows] == list(range(world_size))
    expected = [world_size * (world_size + 1) / 2, sum(10.0 ** r for r in range(world_size))]
    for row in rows:
        assert row["launcher"] == launcher
        assert row["world_size"] == world_size == row["pg_world"]
        assert row["pg_rank"] == row["rank"] == int(row["exported_rank"])
        assert int(row["exported_local_rank"]) == row["local_rank"]
        assert row["sum"] == pytest.approx(expected)
        assert row["backend"] == "gloo"
    assert len({(row["master_addr"], row["master_port"]) for row in rows}) == 1


# --------------------------------------------------------------------------- torchrun-style variables

TORCHRUN_2X2 = {
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}


def test_torchrun_variables():
    launch = detect_launch_env(TORCHRUN_2X2)
    assert launch == LaunchEnv("torchrun", rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                               num_nodes=2, master_addr="10.1.2.3", master_port=29500)
    assert not launch.is_main and launch.distributed


def test_torchrun_wins_over_slurm_and_mpi():
    environ = dict(TORCHRUN_2X2, SLURM_JOB_ID="77", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_ID="0",
                   SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", PMI_RANK="0", PMI_SIZE="2")
    assert detect_launch_env(environ) == detect_launch_env(TORCHRUN_2X2)


def test_torchrun_wins_even_with_broken_slurm_variables():
    environ = dict(TORCHRUN_2X2, SLURM_PROCID="9", SLURM_NTASKS="3", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="2")
    assert detect_launch_env(environ).launcher == "torchrun"


def test_deepspeed_launcher_variables():
    environ = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
               "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    launch = detect_launch_env(environ)
    assert (launch.local_world_size, launch.node_rank, launch.num_nodes) == (4, 1, 2)


def test_torchrun_node_counts_derived_from_local_world_size():
    environ = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
               "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    launch = detect_launch_env(environ)
    assert (launch.node_rank, launch.num_nodes) == (1, 2)


def test_torchrun_world_of_one_needs_no_master():
    launch = detect_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert (launch.world_size, launch.local_rank, launch.master_addr) == (1, 0, "127.0.0.1")
    assert launch.is_main and not launch.distributed


@pytest.mark.parametrize("environ, match", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "rank 2 is outside world size 2"),
    ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "rank -1 is outside"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "at least 1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "local rank 2 is outside local world size 2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "2",
      "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1"}, "node rank 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     "not a TCP port"),
])
def test_torchrun_inconsistent(environ, match):
    with pytest.raises(LaunchError, match=match):
        detect_launch_env(environ)


@pytest.mark.parametrize("master", ["localhost", "127.0.0.1", "127.0.1.1", "::1", "[::1]", "0.0.0.0"])
def test_multi_node_with_loopback_master_fails(master):
    environ = dict(TORCHRUN_2X2, MASTER_ADDR=master)
    with pytest.raises(LaunchError, match="2-node job but master address .* loopback") as info:
        detect_launch_env(environ)
    assert "\n" not in str(info.value)


def test_multi_node_with_hostname_resolving_to_loopback_fails(monkeypatch):
    def fake_getaddrinfo(host, *args, **kwargs):
        table = {"n1": "127.0.1.1", "n2": "10.0.0.2"}
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(LaunchError, match="'n1' is loopback \\(n1 resolves to 127.0.1.1\\)"):
        detect_launch_env(dict(TORCHRUN_2X2, MASTER_ADDR="n1"))
    assert detect_launch_env(dict(TORCHRUN_2X2, MASTER_ADDR="n2")).master_addr == "n2"
    assert detect_launch_env(dict(TORCHRUN_2X2, MASTER_ADDR="unknown-host")).master_addr == "unknown-host"


def test_single_node_with_loopback_master_is_fine():
    environ = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    assert detect_launch_env(environ).num_nodes == 1


# --------------------------------------------------------------------------- Slurm

def _srun(**overrides: str) -> dict[str, str]:
    environ = {
        "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
    }
    environ.update(overrides)
    return {k: v for k, v in environ.items() if v is not None}


def test_srun_task():
    launch = detect_launch_env(_srun())
    assert launch == LaunchEnv("slurm", rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                               num_nodes=2, master_addr="gpu-a01", master_port=20000 + 123456 % 12000)


def test_srun_master_overrides_and_step_nodelist():
    launch = detect_launch_env(_srun(MASTER_ADDR="10.9.9.9", MASTER_PORT="4242"))
    assert (launch.master_addr, launch.master_port) == ("10.9.9.9", 4242)
    launch = detect_launch_env(_srun(SLURM_STEP_NODELIST="gpu-a02,gpu-b[1-3]"))
    assert launch.master_addr == "gpu-a02"


def test_srun_port_is_deterministic_per_job_and_below_the_ephemeral_ports():
    """Every task of a job derives one port, as the sbatch templates do, below Linux's ephemeral range (32768 on):
    an outgoing connection of rank 0's node cannot hold it."""
    first = detect_launch_env(_srun(SLURM_JOB_ID="36007")).master_port
    assert first == detect_launch_env(_srun(SLURM_JOB_ID="36007", SLURM_PROCID="0", SLURM_LOCALID="0",
                                            SLURM_NODEID="0")).master_port == 20007
    assert detect_launch_env(_srun(SLURM_JOB_ID="36008")).master_port == 20008
    assert max(detect_launch_env(_srun(SLURM_JOB_ID=str(j))).master_port for j in range(11990, 12010)) < 32768


def test_srun_uneven_tasks_per_node():
    environ = _srun(SLURM_NTASKS="5", SLURM_NNODES="3", SLURM_TASKS_PER_NODE="2(x2),1", SLURM_NODEID="2",
                    SLURM_PROCID="4", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE=None,
                    SLURM_JOB_NODELIST="n[1-3]")
    launch = detect_launch_env(environ)
    assert (launch.local_world_size, launch.node_rank, launch.num_nodes) == (1, 2, 3)


def test_srun_step_variables_take_precedence():
    environ = _srun(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1", SLURM_STEP_TASKS_PER_NODE="2",
                    SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE=None, SLURM_PROCID="1",
                    SLURM_NODEID="0", SLURM_STEP_NODELIST="gpu-a02")
    launch = detect_launch_env(environ)
    assert (launch.world_size, launch.num_nodes, launch.local_world_size, launch.master_addr) == (
        2, 1, 2, "gpu-a02")


@pytest.mark.parametrize("overrides, match", [
    ({"SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": None}, r"SLURM_NTASKS=3 but SLURM_NNODES=2 x "
                                                          r"SLURM_NTASKS_PER_NODE=2 = 4"),
    ({"SLURM_NTASKS": "3"}, r"SLURM_TASKS_PER_NODE='2\(x2\)' describes 4 tasks on 2 nodes"),
    ({"SLURM_TASKS_PER_NODE": "2(x3)"}, "describes 6 tasks on 3 nodes"),
    ({"SLURM_PROCID": "4"}, "rank 4 is outside world size 4"),
    ({"SLURM_PROCID": "-1"}, "rank -1 is outside"),
    ({"SLURM_LOCALID": "2"}, "local rank 2 is outside local world size 2"),
    ({"SLURM_NODEID": "2"}, "node rank 2 is outside 2 nodes"),
    ({"SLURM_JOB_ID": None}, "SLURM_PROCID is set but SLURM_JOB_ID is not"),
    ({"SLURM_JOB_ID": "abc"}, "not numeric"),
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_NODELIST": "n[1-"}, "unbalanced brackets"),
    ({"SLURM_JOB_NODELIST": "localhost,n2"}, "2-node job but master address 'localhost' is loopback"),
    ({"SLURM_TASKS_PER_NODE": "two"}, "cannot parse Slurm tasks-per-node"),
    ({"SLURM_NTASKS": None}, "SLURM_NTASKS is not set"),
])
def test_srun_inconsistent(overrides, match):
    with pytest.raises(LaunchError, match=match) as info:
        detect_launch_env(_srun(**overrides))
    assert "\n" not in str(info.value)


def test_slurm_procid_without_allocation_fails_even_without_step():
    with pytest.raises(LaunchError, match="not inside a Slurm allocation"):
        detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


#: The SLURM_* variables of an `sbatch -N2 --ntasks-per-node=2` batch shell as Slurm 22.05 sets them (seen on the
#: local cluster; no SLURM_STEP_ID, but SLURM_PROCID/LOCALID/NODEID=0 are there).
SBATCH_SHELL_4_TASKS = {
    "SLURM_JOB_ID": "77", "SLURM_JOBID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_GTIDS": "0", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_CPUS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n[1-2]", "SLURM_TOPOLOGY_ADDR": "n1",
}

MULTI_TASK_BATCH_SHELLS = [
    {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"},
    {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"},
    {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "batch"},
    {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "4294967294"},
    # salloc's interactive step (SLURM_INTERACTIVE_STEP, 0xfffffffa): one task of its own, the job's 8 kept by
    # srun's --preserve-env
    {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "4294967290",
     "SLURM_STEP_NUM_TASKS": "1"},
    SBATCH_SHELL_4_TASKS,
    # `sbatch -N2` without --ntasks: no SLURM_NTASKS, one task per node
    {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "1(x2)"},
]
MULTI_TASK_BATCH_SHELL_IDS = ["salloc-shell", "batch-step-without-step-id", "batch-step-name", "batch-step-number",
                              "salloc-interactive-step", "sbatch-shell-slurm-22.05", "sbatch-N2-without-ntasks"]


@pytest.mark.parametrize("environ", MULTI_TASK_BATCH_SHELLS, ids=MULTI_TASK_BATCH_SHELL_IDS)
def test_sbatch_shell_is_single_process_by_default(environ):
    """merge/verify/export (the default) run as one process in a batch shell."""
    launch = detect_launch_env(environ)
    assert (launch.launcher, launch.world_size, launch.rank) == ("single", 1, 0)


@pytest.mark.parametrize("environ", MULTI_TASK_BATCH_SHELLS, ids=MULTI_TASK_BATCH_SHELL_IDS)
def test_multi_task_sbatch_shell_is_refused_for_training(environ):
    """Training (allow_batch_shell=False) in the shell of a multi-task allocation would use one process of it."""
    with pytest.raises(LaunchError, match=r"batch shell of job 9|batch shell of job 77") as info:
        detect_launch_env(environ, allow_batch_shell=False)
    message = str(info.value)
    assert "\n" not in message
    assert "run it under srun (one task per GPU) or srun + torchrun; see slurm/*.sbatch" in message


@pytest.mark.parametrize("environ", [
    {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NNODES": "1"},
    {"SLURM_JOB_ID": "9", "SLURM_NNODES": "1", "SLURM_TASKS_PER_NODE": "1"},
    {"SLURM_JOB_ID": "9"},
    {},
], ids=["one-task-batch-shell", "one-node-no-ntasks", "nothing-but-job-id", "no-slurm"])
def test_single_task_batch_shell_trains_as_one_process(environ):
    launch = detect_launch_env(environ, allow_batch_shell=False)
    assert (launch.launcher, launch.world_size) == ("single", 1)


def test_launchers_inside_batch_shell_are_not_refused():
    """torchrun or an srun task started from the batch shell carry the job's variables too: not refused."""
    torchrun = dict(SBATCH_SHELL_4_TASKS, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1",
                    MASTER_PORT="29500")
    assert detect_launch_env(torchrun, allow_batch_shell=False).launcher == "torchrun"
    task = _srun(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    assert detect_launch_env(task, allow_batch_shell=False).launcher == "slurm"


def test_srun_substep_ignores_the_jobs_ntasks_per_node():
    """`srun --ntasks=1` inside an --ntasks-per-node=2 job (variables as Slurm 22.05 sets them): srun overrides
    SLURM_NTASKS/SLURM_NNODES for the step and adds the step layout, but passes the job's
    SLURM_NTASKS_PER_NODE through; that is not a contradiction."""
    step = dict(SBATCH_SHELL_4_TASKS, SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_NTASKS="1", SLURM_NPROCS="1",
                SLURM_NNODES="1", SLURM_TASKS_PER_NODE="1", SLURM_STEP_NUM_TASKS="1", SLURM_STEP_NUM_NODES="1",
                SLURM_STEP_TASKS_PER_NODE="1", SLURM_STEP_NODELIST="n1")
    launch = detect_launch_env(step, allow_batch_shell=False)
    assert (launch.launcher, launch.world_size, launch.num_nodes, launch.master_addr) == ("slurm", 1, 1, "n1")


def test_init_refuses_multi_task_batch_shell_only_when_asked(clean_environ):
    clean_environ.update(SBATCH_SHELL_4_TASKS)
    with pytest.raises(LaunchError, match="batch shell of job 77"):
        env_mod.init_distributed(timeout_s=5, allow_batch_shell=False)
    launch = env_mod.init_distributed(timeout_s=5)
    assert (launch.launcher, launch.world_size) == ("single", 1)


@pytest.mark.parametrize("hostlist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3,7],gpu-a[01-02]", ["n1", "n2", "n3", "n7", "gpu-a01", "gpu-a02"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a,b[2],c", ["a", "b2", "c"]),
    ("gpu-a01.cluster.org,gpu-a02.cluster.org", ["gpu-a01.cluster.org", "gpu-a02.cluster.org"]),
    ("x[9-10]", ["x9", "x10"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", "n[1-", "n1]", "n[a-b]", "n[3-1]", "n[[1]]"])
def test_expand_hostlist_rejects_malformed(hostlist):
    with pytest.raises(LaunchError):
        expand_hostlist(hostlist)


def test_expand_hostlist_matches_scontrol_when_available(tmp_path):
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        pytest.skip("scontrol not installed")
    # scontrol reads a slurm.conf before it expands anything: a minimal one of its own, so the check does not
    # depend on whether a cluster is configured on this machine right now.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n")
    hostlist = "n[1-3,7],gpu-a[01-02],rack[1-2]-n[1-2]"
    out = subprocess.run([scontrol, "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SLURM_CONF": str(conf)})
    if out.returncode != 0:
        pytest.skip(f"scontrol show hostnames failed: {out.stderr.strip()}")
    assert expand_hostlist(hostlist) == out.stdout.split()


# --------------------------------------------------------------------------- MPI

def test_open_mpi_variables():
    environ = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    launch = detect_launch_env(environ)
    assert launch == LaunchEnv("mpi", rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1,
                               num_nodes=2, master_addr="", master_port=0)


def test_hydra_variables():
    environ = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
               "MASTER_PORT": "5555"}
    launch = detect_launch_env(environ)
    assert (launch.launcher, launch.rank, launch.local_rank, launch.num_nodes, launch.master_port) == (
        "mpi", 1, 1, 1, 5555)


def test_mpi_without_local_variables_leaves_them_to_init():
    launch = detect_launch_env({"PMI_RANK": "1", "PMI_SIZE": "4"})
    unknown = env_mod.UNKNOWN
    assert (launch.local_rank, launch.local_world_size, launch.node_rank, launch.num_nodes) == (unknown,) * 4


def test_mpi_size_missing_fails():
    with pytest.raises(LaunchError, match="PMI_RANK is set but PMI_SIZE is not"):
        detect_launch_env({"PMI_RANK": "0"})


def test_srun_with_pmi_is_slurm():
    environ = _srun(PMI_RANK="3", PMI_SIZE="4")
    assert detect_launch_env(environ).launcher == "slurm"


def test_mpirun_inside_allocation_is_mpi():
    environ = _srun(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="1", SLURM_NNODES="1",
                    SLURM_TASKS_PER_NODE="1", SLURM_NTASKS_PER_NODE=None,
                    OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4")
    assert detect_launch_env(environ).launcher == "mpi"


@pytest.mark.parametrize("environ, rank", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, "3"),  # Open MPI, no PMI_RANK
    (_srun(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="1", SLURM_NNODES="1",
           SLURM_TASKS_PER_NODE="1", SLURM_NTASKS_PER_NODE=None, OMPI_COMM_WORLD_RANK="3",
           OMPI_COMM_WORLD_SIZE="4"), "3"),  # mpirun inside an allocation: SLURM_PROCID is the daemon's
    (_srun(SLURM_PROCID="1"), "1"),
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
      "SLURM_PROCID": "0"}, "2"),
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "?"),
])
def test_cli_log_lines_name_the_rank_the_launch_detection_reads(clean_environ, environ, rank):
    from lora_dist import cli

    clean_environ.update({k: v for k, v in environ.items() if v is not None})
    assert cli._launch_rank() == rank


def test_nothing_set_is_single_process():
    launch = detect_launch_env({})
    assert launch == LaunchEnv("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0)
    assert detect_launch_env({"MASTER_PORT": "1234"}).master_port == 1234


def test_detect_reads_os_environ_by_default(clean_environ):
    clean_environ.update({"PMI_RANK": "0", "PMI_SIZE": "3"})
    assert detect_launch_env().world_size == 3


# --------------------------------------------------------------------------- init_distributed in this process

def test_init_single_process(clean_environ):
    import torch
    import torch.distributed as dist

    launch = env_mod.init_distributed(timeout_s=30)
    assert (launch.launcher, launch.world_size, launch.master_addr) == ("single", 1, "127.0.0.1")
    assert 0 < launch.master_port < 65536
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    value = torch.tensor([2.5])
    dist.all_reduce(value)
    assert value.item() == 2.5
    assert env_mod.init_distributed() is launch
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    env_mod.destroy_distributed()
    assert not dist.is_initialized()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    env_mod.destroy_distributed()


def test_init_keeps_an_externally_initialized_group(clean_environ):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert env_mod.init_distributed().world_size == 1
    clean_environ.update({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": "29500"})
    with pytest.raises(LaunchError, match="initialized elsewhere as rank 0 of 1 but the torchrun environment "
                                          "says rank 1 of 2"):
        env_mod.init_distributed()


def test_an_externally_initialized_group_sets_the_run_device(clean_environ, monkeypatch):
    """Adopted, a group without NCCL runs on the CPU; one with NCCL on its bound GPU, else this rank's,
    made current (before, the run stayed on the CPU and its tensors met an NCCL-only group)."""
    import torch
    import torch.distributed as dist

    from lora_dist.launch import distributed as module

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        env_mod.init_distributed()
        assert env_mod.run_device() == torch.device("cpu")
        made_current = []
        monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
        monkeypatch.setattr(module, "select_device", lambda launch: torch.device("cuda", 1))
        monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
        env_mod.init_distributed()
        assert env_mod.run_device() == torch.device("cuda", 1) and made_current == [torch.device("cuda", 1)]
    finally:
        env_mod.destroy_distributed()


def test_a_gloo_only_group_claims_no_gpu(clean_environ, monkeypatch):
    """``lora-dist merge`` asks for gloo: on a GPU node its ranks select no GPU, make none current and skip the
    one-GPU-per-rank check (16 merge ranks on an 8-GPU node were refused)."""
    import torch

    from lora_dist.launch import distributed as module

    def no_gpu(*args):
        raise AssertionError("a gloo-only group touched the GPUs")

    monkeypatch.setattr(module, "select_device", no_gpu)
    monkeypatch.setattr(torch.cuda, "set_device", no_gpu)
    try:
        env_mod.init_distributed(backend="gloo")
        assert env_mod.run_device() == torch.device("cpu")
    finally:
        env_mod.destroy_distributed()


def test_init_rank0_alone_times_out(clean_environ):
    clean_environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(_free_port())})
    start = time.monotonic()
    with pytest.raises(LaunchError, match="expected world size 2 but some ranks did not join") as info:
        env_mod.init_distributed(timeout_s=3)
    assert time.monotonic() - start < 15
    assert "\n" not in str(info.value)


def test_init_rank1_alone_times_out(clean_environ):
    # The port stays bound, not listening, for the test: connections to it are refused, and no other test's
    # process can pick it and listen there meanwhile (a store found there made this a join error, now and then).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        clean_environ.update({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(held.getsockname()[1])})
        start = time.monotonic()
        with pytest.raises(LaunchError, match="rank 1 could not reach the master .*expected world size 2"):
            env_mod.init_distributed(timeout_s=3)
        assert time.monotonic() - start < 8


def test_init_port_in_use_fails_fast(clean_environ):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        clean_environ.update(_srun(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="2",
                                   SLURM_NNODES="1", SLURM_TASKS_PER_NODE="2", SLURM_NTASKS_PER_NODE=None,
                                   SLURM_JOB_NODELIST=socket.gethostname(), MASTER_PORT=str(port)))
        start = time.monotonic()
        with pytest.raises(LaunchError, match=f"master port {port} \\(MASTER_PORT\\) is already in use"):
            env_mod.init_distributed(timeout_s=30)
        assert time.monotonic() - start < 5


def test_init_mpi_without_mpi4py(clean_environ, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    clean_environ.update({"PMI_RANK": "0", "PMI_SIZE": "2"})
    with pytest.raises(LaunchError, match="pip install mpi4py"):
        env_mod.init_distributed(timeout_s=5)


@pytest.mark.parametrize("local_rank, visible, want", [
    (3, 8, "cuda:3"),  # every GPU of the node visible
    (5, 1, "cuda:0"),  # --gpus-per-task=1
    (5, 4, "cuda:1"), (2, 4, "cuda:2"),  # --gpu-bind=closest: ranks 4-7 see the second socket's GPUs as cuda:0-3
    (1, 0, "cpu"),
])
def test_each_rank_takes_its_own_gpu_among_those_it_sees(local_rank, visible, want):
    launch = LaunchEnv("torchrun", local_rank, local_rank, 8, 8, 0, 1, "127.0.0.1", 0)
    assert str(env_mod.select_device(launch, cuda_count=visible)) == want


@pytest.mark.parametrize("rank", [0, 3])
def test_mpi_nodes_that_share_a_host_name_are_told_apart_by_the_local_size(monkeypatch, rank):
    """Containers started with one --hostname (or network namespaces) give every rank one processor name: 4 ranks
    of which Open MPI says 2 per node are 2 nodes, and rank 0 offers a routable address, not 127.0.0.1 (the other
    node's ranks would dial their own loopback and time out)."""
    import types

    from lora_dist.launch import distributed

    class World:
        def Get_size(self):
            return 4

        def Get_rank(self):
            return rank

        def allgather(self, value):  # the processor names, then (local rank, local size): 2 ranks per node, by slot
            return [(r % 2, 2) for r in range(4)] if isinstance(value, tuple) else [value] * 4

        def bcast(self, value, root):
            return value if rank == root else ("10.0.0.5", 29400, None)

    fake = types.SimpleNamespace(COMM_WORLD=World(), Get_processor_name=lambda: "same-name")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=fake))
    asked = []
    monkeypatch.setattr(distributed, "_own_address",
                        lambda multi_node, peers, by_name: asked.append((multi_node, by_name)) or "10.0.0.5")
    launch = LaunchEnv("mpi", rank, rank % 2, 4, 2, -1, -1, "", 0)
    got = distributed._mpi_bootstrap(launch)
    assert (got.num_nodes, got.node_rank, got.master_addr) == (2, rank // 2, "10.0.0.5")
    # not by its name: each node resolves the shared name to itself
    assert asked == ([(True, False)] if rank == 0 else [])
    # placed round-robin (mpirun --map-by node), or 3 ranks on one node and 1 on the other: the local size cannot
    # tell the nodes apart; every rank sees the same layout and refuses in one line (none goes on to wait)
    for layout in ([(0, 2), (0, 2), (1, 2), (1, 2)], [(0, 3), (1, 3), (2, 3), (0, 1)]):
        World.allgather = lambda self, value, layout=layout: layout if isinstance(value, tuple) else [value] * 4
        with pytest.raises(LaunchError, match="share one host name .* not placed node by node, as many on each"):
            distributed._mpi_bootstrap(launch)


# --------------------------------------------------------------------------- real multi-process runs

@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _run(cmd: list[str], environ: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.dist
def test_torchrun_two_processes(worker):
    environ = _child_environ(SLURM_JOB_ID="5", SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_STEP_ID="0",
                             SLURM_JOB_NODELIST="localhost")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(worker)]
    rows = _results(_run(cmd, environ).stdout)
    _assert_all_reduced(rows, 2, "torchrun")
    assert [(r["local_rank"], r["local_world_size"], r["num_nodes"]) for r in rows] == [(0, 2, 1), (1, 2, 1)]


@pytest.mark.dist
@pytest.mark.parametrize("drop_local_vars", [False, True], ids=["hydra-local-vars", "mpi4py-split-by-host"])
def test_mpiexec_two_processes(worker, drop_local_vars):
    mpiexec = shutil.which("mpiexec", path=str(VENV_BIN)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not installed (pip install mpich)")
    dropped = ["MPI_LOCALRANKID", "MPI_LOCALNRANKS"] if drop_local_vars else []
    rows = _results(_run([mpiexec, "-n", "2", sys.executable, str(worker), *dropped], _child_environ()).stdout)
    _assert_all_reduced(rows, 2, "mpi")
    assert [(r["local_rank"], r["local_world_size"], r["node_rank"], r["num_nodes"]) for r in rows] == [
        (0, 2, 0, 1), (1, 2, 0, 1)]
    assert rows[0]["master_port"] > 0


def _fake_srun(worker: Path, tasks: list[dict[str, str]]) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, str(worker)], env=_child_environ(**task), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for task in tasks]
    return _results(_outputs(procs, 60, "fake srun task"))


def _outputs(procs: list[subprocess.Popen], timeout: float, what: str) -> str:
    """Every process's stdout, joined, once each has exited 0; any still running at the end is killed."""
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{what} failed:\n{stdout}\n{stderr[-4000:]}"
            outputs.append(stdout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return "".join(outputs)


@pytest.mark.dist
def test_fake_srun_two_tasks_one_node(worker):
    port = _free_port(20000, 32000)
    job_id = str(port - 20000 + 12000 * 3)
    common = {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
              "SLURM_TASKS_PER_NODE": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0",
              "SLURM_JOB_NODELIST": socket.gethostname()}
    rows = _fake_srun(worker, [dict(common, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in (1, 0)])
    _assert_all_reduced(rows, 2, "slurm")
    assert rows[0]["master_port"] == port
    assert rows[0]["master_addr"] == socket.gethostname()


def _routable_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.mark.dist
def test_fake_srun_two_nodes(worker):
    address = _routable_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    common = {"SLURM_JOB_ID": "424242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
              "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NTASKS_PER_NODE": "1", "SLURM_LOCALID": "0",
              "SLURM_JOB_NODELIST": "ld-node[1-2]", "MASTER_ADDR": address, "MASTER_PORT": str(_free_port())}
    rows = _fake_srun(worker, [dict(common, SLURM_PROCID=str(r), SLURM_NODEID=str(r)) for r in (0, 1)])
    _assert_all_reduced(rows, 2, "slurm")
    assert [(r["node_rank"], r["num_nodes"], r["local_world_size"]) for r in rows] == [(0, 2, 1), (1, 2, 1)]


# --------------------------------------------------------------------------- launchers/ scripts

LAUNCHERS = REPO_ROOT / "launchers"

STANDIN = r"""
import json, os, sys
import torch
import torch.distributed as dist
from lora_dist.launch import destroy_distributed, init_distributed

def main():
    args = sys.argv[1:]
    assert args[0] == "train", args
    launch = init_distributed(timeout_s=60)
    value = torch.tensor([float(launch.rank + 1), 10.0 ** launch.rank])
    dist.all_reduce(value)
    result = dict(launch.__dict__, sum=value.tolist(), backend=dist.get_backend(), pg_rank=dist.get_rank(),
                  pg_world=dist.get_world_size(), exported_rank=os.environ["RANK"],
                  exported_local_rank=os.environ["LOCAL_RANK"], args=args[1:])
    os.write(1, ("RESULT " + json.dumps(result) + "\n").encode())
    destroy_distributed()

if __name__ == "__main__":
    main()
"""


@pytest.fixture
def standin(tmp_path: Path) -> dict[str, str]:
    """Environment in which ``lora-dist`` and ``python -m lora_dist.cli`` are an all_reduce stand-in."""
    bin_dir, overlay = tmp_path / "bin", tmp_path / "overlay" / "lora_dist"
    bin_dir.mkdir()
    overlay.mkdir(parents=True)
    (overlay / "__init__.py").write_text("")
    (overlay / "launch").symlink_to(REPO_ROOT / "lora_dist" / "launch")
    (overlay / "cli.py").write_text(STANDIN)
    program = bin_dir / "lora-dist"
    program.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(overlay / 'cli.py')!r}, "
                       f"run_name='__main__')\n")
    program.chmod(0o755)
    environ = _child_environ(PYTHONPATH=str(overlay.parent))
    environ["PATH"] = os.pathsep.join([str(bin_dir), environ["PATH"]])
    return environ


@pytest.mark.dist
@pytest.mark.parametrize("script, extra, launcher", [
    ("torchrun_single_node.sh", {"NPROC": "2"}, "torchrun"),
    ("mpirun.sh", {"NP": "2"}, "mpi"),
    ("deepspeed_hostfile.sh", {"NPROC": "2", "MASTER_PORT": "free"}, "torchrun"),
    ("accelerate_launch.sh", {"MAIN_PROCESS_PORT": "free"}, "torchrun"),
])
def test_launcher_script(standin, tmp_path, script, extra, launcher):
    if script == "mpirun.sh" and shutil.which("mpiexec", path=standin["PATH"]) is None:
        pytest.skip("mpiexec not installed")
    environ = dict(standin, **{k: str(_free_port()) if v == "free" else v for k, v in extra.items()})
    args = ["cfg.yaml", "train.lr=1e-3", "data.note=two words"]
    proc = subprocess.run(["bash", str(LAUNCHERS / script), *args], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    rows = _results(proc.stdout)
    _assert_all_reduced(rows, 2, launcher)
    expected_args = args[1:] if script != "accelerate_launch.sh" else ["parallel.strategy=fsdp2", *args[1:]]
    assert all(row["args"] == ["cfg.yaml", *expected_args] for row in rows)


@pytest.mark.dist
@pytest.mark.parametrize("content, strategy, ours", [
    ((LAUNCHERS / "accelerate_deepspeed.yaml").read_text(), "zero3", "run.cfg"),
    ("distributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\n", None, "cfg.yaml"),
], ids=["deepspeed-renamed", "multi-gpu"])
def test_accelerate_strategy_comes_from_config_content(standin, tmp_path, content, strategy, ours):
    """A renamed copy of a shipped config keeps its strategy, its override after lora_dist's config whatever that
    file's name (the CLI takes a first argument without "=" as the config); a config without one adds none."""
    config = tmp_path / "my_accelerate.yaml"
    config.write_text(content)
    environ = dict(standin, ACCELERATE_CONFIG=str(config), MAIN_PROCESS_PORT=str(_free_port()))
    proc = subprocess.run(["bash", str(LAUNCHERS / "accelerate_launch.sh"), ours, "train.lr=1e-3"], env=environ,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _results(proc.stdout)
    _assert_all_reduced(rows, 2, "torchrun")
    expected = [ours, f"parallel.strategy={strategy}", "train.lr=1e-3"] if strategy else [ours, "train.lr=1e-3"]
    assert all(row["args"] == expected for row in rows)
    if strategy is None:
        assert "parallel.strategy comes from the lora_dist config" in proc.stderr


@pytest.mark.parametrize("content, message", [
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n", "fsdp_version: 2"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  offload_param_device: cpu\n", "zero_stage: 1, 2 or 3"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  deepspeed_config_file: ds.json\n",
     "deepspeed_config_file is not used"),
    (None, "cannot read accelerate config"),
], ids=["fsdp1", "no-zero-stage", "ds-config-file", "missing"])
def test_accelerate_launch_refuses_config_it_cannot_honour(standin, tmp_path, content, message):
    config = tmp_path / "acc.yaml"
    if content is not None:
        config.write_text(content)
    environ = dict(standin, ACCELERATE_CONFIG=str(config))
    proc = subprocess.run(["bash", str(LAUNCHERS / "accelerate_launch.sh"), "cfg.yaml"], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "RESULT" not in proc.stdout


@pytest.mark.dist
@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_torchrun_multi_node_script(standin, tmp_path, rdzv):
    address = _routable_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    port = str(_free_port())
    procs = []
    for node_rank in (0, 1):
        environ = dict(standin, NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR=address, MASTER_PORT=port,
                       NPROC_PER_NODE="1", RDZV=rdzv)
        procs.append(subprocess.Popen(["bash", str(LAUNCHERS / "torchrun_multi_node.sh"), "cfg.yaml"], env=environ,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows = _results(_outputs(procs, 120, "node"))
    _assert_all_reduced(rows, 2, "torchrun")
    assert [(r["node_rank"], r["num_nodes"], r["master_addr"]) for r in rows] == [(0, 2, address), (1, 2, address)]


# --------------------------------------------------------------------------- bad launches through the CLI

#: A bad launch must fail before any work: well under this many seconds (the first run of a test process waits for
#: the zygote's imports too).
BAD_LAUNCH_WALL_S = 60


@pytest.fixture(scope="module")
def cli_assets(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    from lora_dist.demo import write_demo_data

    root = tmp_path_factory.mktemp("cli-launch")
    return {"root": root, "base": tiny_checkpoint("llama", hidden=64, layers=2),
            "data": write_demo_data(root / "data.jsonl", n=64)}


def _cli(args: list[str], launch_vars: dict[str, str], timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m lora_dist.cli ARGS`` with only ``launch_vars`` as launcher variables, forked from the test
    process's zygote (the launch is detected at run time, not at import); (result, wall seconds)."""
    environ = _child_environ(TOKENIZERS_PARALLELISM="false", **launch_vars)
    start = time.monotonic()
    proc = lora_dist(*args, timeout=timeout, check=False, exact_env=environ)
    return proc, time.monotonic() - start


def _train_args(assets: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    return ["train", f"model.path={assets['base']}", f"data.path={assets['data']}", f"output.dir={out}",
            "train.steps=1", "train.seq_len=32", "train.eval_every=0", "data.eval_fraction=0",
            "export.merged=false", "checkpoint.every=0", *overrides]


def _assert_one_line_launch_error(proc: subprocess.CompletedProcess, wall_s: float, needles: tuple[str, ...],
                                  command: str = "train") -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    prefix = f"lora-dist {command}: error: "
    assert lines and lines[-1].startswith(prefix), proc.stderr[-3000:]
    assert sum(line.startswith(prefix) for line in lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert wall_s < BAD_LAUNCH_WALL_S, f"took {wall_s:.1f}s to fail: {lines[-1]}"
    return lines[-1]


def _srun_task_vars(**overrides: str) -> dict[str, str]:
    return _srun(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", **overrides)


def _hostname_resolving_to_loopback() -> str | None:
    host = socket.gethostname()
    return host if loopback_address(host) not in (None, host) else None


@pytest.mark.parametrize("case", [
    "ntasks-vs-nodes-x-tasks-per-node", "torchrun-master-localhost", "slurm-first-node-resolves-to-loopback",
    "slurm-first-node-localhost", "torchrun-port-in-use", "slurm-port-in-use", "rank1-never-joins",
    "rank0-cannot-reach-master", "slurm-vars-without-allocation", "training-in-multi-task-sbatch-shell",
])
def test_cli_train_bad_launch_is_one_line(cli_assets, tmp_path, case):
    """``lora-dist train`` under a bad launch environment: exit 2, no traceback, one last line naming the cause
    and the fix, fast (the timeout cases use parallel.timeout_s=3)."""
    overrides = ["parallel.strategy=fsdp2", "parallel.timeout_s=3"]
    holder = None
    if case == "ntasks-vs-nodes-x-tasks-per-node":
        launch_vars = _srun_task_vars(SLURM_NTASKS="3", SLURM_TASKS_PER_NODE=None)
        needles = ("SLURM_NTASKS=3 but SLURM_NNODES=2 x SLURM_NTASKS_PER_NODE=2", "request --ntasks equal to")
    elif case == "torchrun-master-localhost":
        launch_vars = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "localhost", "MASTER_PORT": str(_free_port())}
        needles = ("2-node job but master address 'localhost' is loopback", "set MASTER_ADDR")
    elif case == "slurm-first-node-resolves-to-loopback":
        host = _hostname_resolving_to_loopback()
        if host is None:
            pytest.skip("this machine's hostname does not resolve to loopback")
        launch_vars = _srun_task_vars(SLURM_JOB_NODELIST=f"{host},n2")
        needles = (f"master address '{host}' is loopback ({host} resolves to 127.", "set MASTER_ADDR")
    elif case == "slurm-first-node-localhost":
        launch_vars = _srun_task_vars(SLURM_JOB_NODELIST="localhost,n2")
        needles = ("2-node job but master address 'localhost' is loopback", "set MASTER_ADDR")
    elif case in ("torchrun-port-in-use", "slurm-port-in-use"):
        holder = socket.socket()
        holder.bind(("", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        if case == "torchrun-port-in-use":  # rank 0 hosts the store (hand-set variables, DeepSpeed launcher)
            launch_vars = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": port}
        else:  # e.g. a second srun step of the same job
            launch_vars = _srun_task_vars(SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_TASKS_PER_NODE="2",
                                          SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=port)
        needles = (f"master port {port} (MASTER_PORT) is already in use", "set MASTER_PORT to a free port")
    elif case == "rank1-never-joins":
        launch_vars = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}
        needles = ("rank 0 hosting the store", "expected world size 2 but some ranks did not join within 3s",
                   "start all ranks")
    elif case == "rank0-cannot-reach-master":
        launch_vars = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}
        needles = ("rank 1 could not reach the master at 127.0.0.1:", "within 3s", "check that rank 0 is running")
    elif case == "slurm-vars-without-allocation":
        launch_vars = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
        needles = ("SLURM_PROCID is set but SLURM_JOB_ID is not", "run under srun/sbatch or unset the SLURM_*")
    else:
        launch_vars = dict(SBATCH_SHELL_4_TASKS)
        needles = ("batch shell of job 77", "SLURM_NTASKS=4: 4 tasks on 2 nodes",
                   "run it under srun (one task per GPU) or srun + torchrun; see slurm/*.sbatch")
        overrides = ["parallel.strategy=none"]
    launch_vars = {k: v for k, v in launch_vars.items() if v is not None}
    out = tmp_path / "out"
    try:
        proc, wall_s = _cli(_train_args(cli_assets, out, *overrides), launch_vars)
    finally:
        if holder is not None:
            holder.close()
    _assert_one_line_launch_error(proc, wall_s, needles)
    assert not (out / "adapter").exists()


@pytest.fixture(scope="module")
def finished_run(cli_assets) -> Path:
    """A one-step single-process run (adapter + config.json), trained outside any launcher."""
    out = cli_assets["root"] / "run"
    proc, _ = _cli(_train_args(cli_assets, out, "parallel.strategy=none"), {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("command", ["merge", "verify", "export"])
def test_file_commands_still_run_as_one_process_in_sbatch_shell(cli_assets, finished_run, tmp_path, command):
    """Only training refuses a multi-task batch shell: merge/verify/export on the batch host run as one process."""
    merged = tmp_path / "merged"
    if command == "merge":
        args = ["merge", "--base", str(cli_assets["base"]), "--adapter", str(finished_run / "adapter"),
                "--out", str(merged)]
    elif command == "export":
        args = ["export", str(finished_run), "--out", str(merged)]
    else:
        prepared, _ = _cli(["merge", "--base", str(cli_assets["base"]), "--adapter", str(finished_run / "adapter"),
                            "--out", str(merged)], {})
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        args = ["verify", str(merged), "--base", str(cli_assets["base"]), "--adapter", str(finished_run / "adapter")]
    proc, _ = _cli(args, dict(SBATCH_SHELL_4_TASKS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if command != "verify":
        assert (merged / "model.safetensors.index.json").is_file() or any(merged.glob("*.safetensors"))


@pytest.mark.parametrize("gpus,clash", [
    ([f"gpu{r}" for r in range(12)], None),
    ([f"gpu{r}" for r in range(11)] + ["gpu3"], "ranks 3 and 11 both use GPU gpu3 on "),
])
def test_two_ranks_on_one_gpu_fail_every_rank_in_one_line_with_few_store_requests(monkeypatch, gpus, clash):
    """The ranks' GPUs (stand-ins, by uuid) meet in one store: every rank raises the same line naming the two ranks,
    or none does; each rank makes a handful of requests (it read every rank's key: world size squared in all)."""
    import threading
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from lora_dist.launch import distributed

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid=device))
    store, requests = dist.HashStore(), []

    class Counting:  # the store, counting each rank's requests
        def __getattr__(self, name):
            requests.append(name)
            return getattr(store, name)

    errors: dict[int, str] = {}

    def rank(r: int) -> None:
        env = LaunchEnv("torchrun", r, r, len(gpus), len(gpus), 0, 1, "127.0.0.1", 1)
        try:
            distributed._check_distinct_gpus(Counting(), env, gpus[r])
        except LaunchError as e:
            errors[r] = str(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(gpus))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if clash is None:
        assert errors == {}
    else:
        assert set(errors) == set(range(len(gpus))) and len(set(errors.values())) == 1
        assert next(iter(errors.values())).startswith(clash) and "\n" not in errors[0]
    assert len(requests) <= 7 * len(gpus)  # at most 7 each; reading every rank's key was 12 + 12 x 12


def test_a_job_restart_is_told_from_its_first_start():
    """What a resume reads to go on from the run's own checkpoints after torchrun or Slurm restarted the job."""
    from lora_dist.launch.detect import job_restart

    assert job_restart({}) is None
    assert job_restart({"TORCHELASTIC_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": "0"}) is None
    assert job_restart({"TORCHELASTIC_RESTART_COUNT": "2"}) == "torchrun restart 2 (TORCHELASTIC_RESTART_COUNT)"
    assert job_restart({"SLURM_RESTART_COUNT": "1"}) == "Slurm requeue 1 (SLURM_RESTART_COUNT)"
    assert job_restart({"SLURM_RESTART_COUNT": "x"}) is None
