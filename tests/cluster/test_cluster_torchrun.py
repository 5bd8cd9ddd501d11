"""torchrun across the two network namespaces, no Slurm: static rendezvous on node 1."""

from __future__ import annotations

import subprocess

import pytest
from cluster_jobs import (
    NODE_ADDR,
    NODE_IFNAME,
    NODE_NETNS,
    VENV_BIN,
    assert_one_rank_pair_per_namespace,
    job_env,
    read_rank_results,
)

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("local_cluster")]

MASTER_PORT = 29531


def test_torchrun_static_rendezvous_across_namespaces(tmp_path, train_command):
    out = tmp_path / "out"
    procs = []
    try:
        for node_rank, node in enumerate(["n1", "n2"]):
            cmd = [
                "nsenter", f"--net=/var/run/netns/{NODE_NETNS[node]}",
                str(VENV_BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=2", f"--node_rank={node_rank}",
                f"--master_addr={NODE_ADDR['n1']}", f"--master_port={MASTER_PORT}",
                "--no-python", *train_command.argv, *train_command.args(out),
            ]  # fmt: skip
            log = open(tmp_path / f"{node}.log", "w")
            env = job_env(GLOO_SOCKET_IFNAME=NODE_IFNAME[node])
            procs.append((node, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for node, proc, log in procs:
            proc.wait(timeout=240)
            log.close()
            assert proc.returncode == 0, f"{node}: torchrun exited {proc.returncode}\n{(tmp_path / f'{node}.log').read_text()}"
    finally:
        for _, proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()

    train_command.check(out, 4)
    if train_command.name == "standin":
        assert_one_rank_pair_per_namespace(read_rank_results(out, 4), "node_rank", (0, 1))
