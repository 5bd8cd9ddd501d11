"""slurm/local_cluster.sh: idempotent, self-repairing, and confined to its own network."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster_jobs import NODE_NETNS, harness

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("local_cluster")]

STATE_DIR = Path("/run/lora-dist-cluster")


def sinfo_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines())


def _dead_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_up_twice_leaves_a_healthy_cluster_alone():
    pids_before = {p.name: p.read_text() for p in STATE_DIR.glob("*.started")}
    up = harness("up")
    assert up.returncode == 0, up.stderr
    assert "already up" in up.stderr
    assert {p.name: p.read_text() for p in STATE_DIR.glob("*.started")} == pids_before
    status = harness("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert sinfo_states() == {"n1": "idle", "n2": "idle"}


def test_up_repairs_a_cluster_whose_node_daemon_died():
    pid = int((STATE_DIR / "slurmd-n2.started").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    # No wait for the pid to vanish: the dead daemon may stay a zombie until init reaps it, and the
    # harness must see it as dead at once (right after the kill is the race that matters).
    deadline = time.monotonic() + 10
    while not _dead_or_zombie(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert harness("status").returncode != 0, "status should notice the dead slurmd"

    up = harness("up")
    assert up.returncode == 0, up.stderr
    assert harness("status").returncode == 0
    assert sinfo_states() == {"n1": "idle", "n2": "idle"}


def test_nodes_only_reach_the_cluster_network():
    for netns in NODE_NETNS.values():
        routes = subprocess.run(["ip", "-n", netns, "route"], capture_output=True, text=True, check=True).stdout
        assert "default" not in routes
        assert [line.split()[0] for line in routes.splitlines()] == ["10.77.0.0/24"]
