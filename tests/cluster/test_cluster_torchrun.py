"""torchrun across the two network namespaces, no Slurm.

Static rendezvous (torchrun called directly, node 0 = n1), and c10d rendezvous
through ``launchers/torchrun_multi_node.sh``: both namespaces share the
machine's hostname, so torchrun cannot tell which node hosts the rendezvous
store; the script's ``--rdzv_conf is_host=1`` (plus ``--local_addr``) on node 0
is what makes the 4-rank world form.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from cluster_jobs import (
    NODE_ADDR,
    NODE_IFNAME,
    NODE_NETNS,
    REPO,
    VENV_BIN,
    assert_one_rank_pair_per_namespace,
    job_env,
    read_rank_results,
)

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("local_cluster")]

MASTER_PORT = 29531
C10D_PORT = 29532
MULTI_NODE_SCRIPT = REPO / "launchers" / "torchrun_multi_node.sh"


def _run_on_both_nodes(tmp_path: Path, commands: dict[str, tuple[list[str], dict[str, str]]], timeout: float) -> None:
    """Start one command per node (``{node: (cmd, env)}``) at once; wait for all; each must exit 0."""
    procs = []
    try:
        for node, (cmd, env) in commands.items():
            log = open(tmp_path / f"{node}.log", "w")
            procs.append((node, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for node, proc, log in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{node}: no result after {timeout:.0f} s (rendezvous hung?)\n"
                                     f"{(tmp_path / f'{node}.log').read_text()[-4000:]}") from None
            log.close()
            text = (tmp_path / f"{node}.log").read_text()
            assert proc.returncode == 0, f"{node}: exited {proc.returncode}\n{text[-6000:]}"
    finally:
        for _, proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def test_torchrun_static_rendezvous_across_namespaces(tmp_path, train_command):
    out = tmp_path / "out"
    commands = {}
    for node_rank, node in enumerate(["n1", "n2"]):
        cmd = [
            "nsenter", f"--net=/var/run/netns/{NODE_NETNS[node]}",
            str(VENV_BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=2", f"--node_rank={node_rank}",
            f"--master_addr={NODE_ADDR['n1']}", f"--master_port={MASTER_PORT}",
            "--no-python", *train_command.argv, *train_command.args(out),
        ]  # fmt: skip
        commands[node] = (cmd, job_env(GLOO_SOCKET_IFNAME=NODE_IFNAME[node]))
    _run_on_both_nodes(tmp_path, commands, timeout=240)

    train_command.check(out, 4)
    if train_command.name == "standin":
        assert_one_rank_pair_per_namespace(read_rank_results(out, 4), "node_rank", (0, 1))


def _standin_shim(tmp_path: Path, argv: tuple[str, ...]) -> Path:
    """A directory with a ``lora-dist`` that runs the stand-in: the launcher script runs ``lora-dist train``."""
    shim = tmp_path / "shim-bin"
    shim.mkdir()
    exe = shim / "lora-dist"
    exe.write_text("#!/bin/sh\n# drop the 'train' subcommand\nshift\nexec " + " ".join(argv) + ' "$@"\n')
    exe.chmod(0o755)
    return shim


def _assert_two_namespaces(results: list[dict]) -> None:
    """Ranks {0,1} and {2,3} each ran in one namespace, on its own veth; the two differ.

    c10d assigns node ranks itself (not necessarily n1 = 0), so either node may hold ranks 0-1.
    """
    by_node: dict[int, list[dict]] = {}
    for r in results:
        by_node.setdefault(r["node_rank"], []).append(r)
    assert sorted(by_node) == [0, 1], f"node ranks {sorted(by_node)}"
    assert sorted(r["rank"] for r in by_node[0]) == [0, 1] and sorted(r["rank"] for r in by_node[1]) == [2, 3]
    netns = [{r["net_namespace"] for r in by_node[k]} for k in (0, 1)]
    ifnames = [{r["socket_ifname"] for r in by_node[k]} for k in (0, 1)]
    assert all(len(n) == 1 for n in netns) and netns[0] != netns[1], f"namespaces {netns}"
    assert sorted(next(iter(i)) for i in ifnames) == sorted(NODE_IFNAME.values()), f"interfaces {ifnames}"


def test_torchrun_multi_node_script_c10d_rendezvous_across_namespaces(tmp_path, train_command):
    """launchers/torchrun_multi_node.sh, default RDZV=c10d, run once per namespace, forms one 4-rank world. n2
    hosts the rendezvous (NODE_RANK=0, MASTER_ADDR its address) and n1, whose address sorts first, becomes group
    rank 0: the workers' master is then the address the script found for n1 (its route to n2), not n1's
    socket.getfqdn(), which is "localhost" on these machines."""
    out = tmp_path / "out"
    extra_path = []
    if train_command.name == "standin":
        extra_path = [str(_standin_shim(tmp_path, train_command.argv))]
    rdzv_id = f"c10d-test-{uuid.uuid4().hex[:8]}"
    commands = {}
    for node_rank, node in enumerate(["n2", "n1"]):
        cmd = ["nsenter", f"--net=/var/run/netns/{NODE_NETNS[node]}", "bash", str(MULTI_NODE_SCRIPT),
               *train_command.args(out)]
        env = job_env(GLOO_SOCKET_IFNAME=NODE_IFNAME[node], NNODES="2", NODE_RANK=str(node_rank),
                      MASTER_ADDR=NODE_ADDR["n2"], MASTER_PORT=str(C10D_PORT), NPROC_PER_NODE="2",
                      RDZV="c10d", RDZV_ID=rdzv_id, LOGLEVEL="INFO")  # torchrun's agents log the rendezvous
        if extra_path:
            env["PATH"] = ":".join([*extra_path, env["PATH"]])
        commands[node] = (cmd, env)
    _run_on_both_nodes(tmp_path, commands, timeout=300)
    for node in ("n1", "n2"):  # torchrun's agents log the rendezvous result: group rank 0 is n1, at its address
        assert f"master_addr={NODE_ADDR['n1']}" in (tmp_path / f"{node}.log").read_text(), node

    train_command.check(out, 4)
    if train_command.name == "standin":
        _assert_two_namespaces(read_rank_results(out, 4))
