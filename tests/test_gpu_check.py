"""scripts/gpu_check.sh stays runnable: its CPU-possible checks pass on the CPU (the GPU ones say skipped)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.dist
def test_gpu_check_cpu_smoke(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "cpu-smoke" / "results.json").read_text())["checks"]
    status = {r["check"]: r["status"] for r in results}
    ran = [name for name, s in status.items() if s == "ok"]
    # probes, LoRALinear, the fused layer with dropout, the merge and fsdp2 run on the CPU; the others need CUDA
    assert len(ran) == 5 and all(s in ("ok", "skipped") for s in status.values()), status
    assert (tmp_path / "cpu-smoke" / "results.md").is_file()


@pytest.mark.dist
def test_gpu_check_runs_the_named_checks_within_its_budget_on_a_given_python(tmp_path):
    """What a short GPU lease needs: ``--checks`` runs only those, a check past ``--budget-s`` is skipped saying
    so, the results are written all the same, and ``LORA_DIST_PYTHON`` runs it on an existing Python."""
    import sys

    def run(out, *args):
        proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out), *args],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env=dict(os.environ, LORA_DIST_PYTHON=sys.executable))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {r["check"]: r for r in json.loads((out / "cpu-smoke" / "results.json").read_text())["checks"]}

    chosen = run(tmp_path / "a", "--checks", "device_probes", "merge_on_device")
    assert {name: r["status"] for name, r in chosen.items()} == {
        "device selection probes": "ok", "merge on the device equals the CPU merge (fp32 bound)": "ok"}
    late = run(tmp_path / "b", "--checks", "device_probes", "--budget-s", "0")
    assert late["device selection probes"]["status"] == "skipped"
    assert "out of time" in late["device selection probes"]["detail"]
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--checks", "nope"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, LORA_DIST_PYTHON=sys.executable))
    assert proc.returncode == 2 and "unknown check 'nope'" in proc.stderr


@pytest.mark.parametrize("args,visible", [
    (["--cpu-smoke", "--budget-s", "9"], ""),
    (["--budget-s", "9", "--cpu-smoke"], ""),  # the flag anywhere: before, only first hid the GPUs
    (["--budget-s", "9"], "0"),
])
def test_cpu_smoke_hides_the_gpus_wherever_the_flag_stands(tmp_path, args, visible):
    """What the script starts its Python with (a stand-in here that prints it): no GPU under --cpu-smoke, so the
    checks' own launches cannot find one and run NCCL while the results say cpu-smoke."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "visible=[${CUDA_VISIBLE_DEVICES-unset}] $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, LORA_DIST_PYTHON=str(fake), CUDA_VISIBLE_DEVICES="0")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    launched = [line for line in proc.stdout.splitlines() if "scripts/gpu_check.py" in line]
    assert launched == [f"visible=[{visible}] scripts/gpu_check.py {' '.join(args)}"]


@pytest.mark.dist
def test_dry_run_runs_a_gpu_check_on_the_cpu(tmp_path):
    """``--dry-run`` tries a GPU check's code before a lease (here ddp, one process with gloo); without it the check
    is skipped on the CPU."""
    import sys

    def status(*args):
        out = tmp_path / str(len(args))
        proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out),
                               "--checks", "ddp", *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                              env=dict(os.environ, LORA_DIST_PYTHON=sys.executable))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        (result,) = json.loads((out / "cpu-smoke" / "results.json").read_text())["checks"]
        return result["status"], result["detail"]

    assert status() == ("skipped", "needs 1 CUDA GPU(s)")
    ran, detail = status("--dry-run")
    assert ran == "ok" and "per-step peak memory" in detail
