"""slurm/local_cluster.sh's process helpers, on a real zombie: a killed daemon stays one until it is reaped.

The cluster tests only meet a zombie when init is slow to reap a killed slurmd, so whether they cover it
depends on timing. Here the test's own child is killed and not reaped: a zombie for as long as the test
holds it, whose /proc/PID/comm still reads ``sleep``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local_cluster.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def helper(call: str) -> subprocess.CompletedProcess:
    """Run ``call`` in bash after sourcing the script (which then defines its functions and runs nothing)."""
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}"; {call}'], capture_output=True, text=True, timeout=30)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def zombie():
    child = subprocess.Popen(["sleep", "300"])
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while state(child.pid) != "Z":
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)
    assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "sleep"  # what fooled the harness
    yield child.pid
    child.wait()


@pytest.fixture
def sleeper():
    child = subprocess.Popen(["sleep", "300"])
    yield child.pid
    child.kill()
    child.wait()


def test_sourcing_the_script_runs_no_command():
    out = helper("echo sourced")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "sourced\n" and "usage" not in out.stderr


def test_a_live_daemon_counts_as_running(sleeper):
    assert helper(f"running {sleeper}").returncode == 0
    assert helper(f"comm_is {sleeper} sleep").returncode == 0
    assert helper(f"comm_is {sleeper} slurmd").returncode != 0  # a recycled pid is not ours


def test_a_zombie_counts_as_dead(zombie):
    assert helper(f"running {zombie}").returncode != 0
    assert helper(f"comm_is {zombie} sleep").returncode != 0


def test_stopping_a_zombie_returns_at_once(zombie):
    t0 = time.monotonic()
    out = helper(f"stop_pids {zombie}")
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 5, "stop_pids waited for a zombie to exit (it waits up to 10 s for the living)"


def test_a_reaped_pid_counts_as_dead():
    child = subprocess.Popen(["sleep", "300"])
    child.kill()
    child.wait()  # reaped: /proc/PID is gone
    assert not Path(f"/proc/{child.pid}").exists()
    assert helper(f"running {child.pid}").returncode != 0
    assert helper(f"comm_is {child.pid} sleep").returncode != 0
