"""Fixtures for tests on a real two-node Slurm cluster built on this machine.

The session fixture ``local_cluster`` runs ``slurm/local_cluster.sh up`` (which
installs slurm-wlm with apt-get when missing) and ``down`` at the end, unless
the cluster was already up before the session. The tests skip, with the
reason, when the machine cannot host the cluster (not root, no ``ip netns``,
no Slurm and no apt-get); once it can, a failure to bring it up fails them.

What the jobs run is a parameter (``train_command``): by default the real
``lora-dist train configs/demo.yaml``, checked by the adapter it writes; with
``LORA_DIST_CLUSTER_TRAIN=standin`` a stand-in (``allreduce_job.py``: one gloo
all-reduce, results checked numerically).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The tests import their helpers as `cluster_jobs`, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_jobs import TrainCommand, harness, train_command_from_env  # noqa: E402

# Held for the whole session so that two pytest runs on one machine do not
# tear down each other's cluster; a second run waits here.
LOCK_PATH = Path("/run/lora-dist-cluster.lock")
LOCK_WAIT_S = 420


def _cluster_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurm daemons)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "'ip netns' is not available"
    if shutil.which("nsenter") is None:
        return "nsenter is not available"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and apt-get is not available to install it"
    return None


@pytest.fixture(scope="session")
def local_cluster():
    """A running two-node cluster (n1 in netns ldn1, n2 in ldn2) for the session."""
    reason = _cluster_unavailable_reason()
    if reason:
        pytest.skip(f"local Slurm cluster: {reason}")
    with open(LOCK_PATH, "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session has held {LOCK_PATH} for {LOCK_WAIT_S}s")
                time.sleep(2)
        was_up = harness("status", timeout=30).returncode == 0
        up = harness("up")
        if up.returncode != 0:
            pytest.fail(f"slurm/local_cluster.sh up failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")
        try:
            yield
        finally:
            if not was_up:
                down = harness("down", timeout=120)
                if down.returncode != 0:
                    print(f"slurm/local_cluster.sh down failed:\n{down.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def train_command(tmp_path_factory) -> TrainCommand:
    return train_command_from_env(tmp_path_factory.mktemp("train-assets"))
