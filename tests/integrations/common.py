"""What the integration tests share: the tolerance, adapter comparisons, running examples (python, srun-like)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import distutil
from distutil import REPO, free_port, quiet_env

STEPS = 3
LR = 5e-3
#: As in tests/test_train_dist.py: 1/300 of the largest move (lr x steps), and a comparison must stay within half.
ADAPTER_ATOL = LR * STEPS / 300
LORA = ["lora.r=4", "lora.target_modules=[q_proj,v_proj,down_proj]"]


def assert_same_adapter(a: Path, b: Path, atol: float = ADAPTER_ATOL) -> None:
    distutil.assert_same_adapter(a, b, atol)


def python(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python ARGS`` as one process in the repo (an example script); its output in the error if it fails."""
    cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def srun(nproc: int, *args: str, timeout: float = 300) -> None:
    """``python ARGS`` as ``nproc`` tasks of one node the way ``srun`` starts them: Slurm's variables, no torchrun's."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = {k: v for k, v in quiet_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_NODEID="0", SLURM_NTASKS=str(nproc), SLURM_NNODES="1", SLURM_TASKS_PER_NODE=str(nproc),
                   SLURM_NTASKS_PER_NODE=str(nproc), SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        log = tempfile.TemporaryFile("w+")  # not a pipe: a task blocked on a full pipe would hang the others
        procs.append((subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=log), log))
    try:
        for proc, log in procs:
            proc.wait(timeout=timeout)
            log.seek(0)
            if proc.returncode != 0:
                raise AssertionError(f"srun-like launch failed ({proc.returncode}):\n{log.read()[-6000:]}")
    finally:
        for proc, _ in procs:  # the tasks this helper started, and only those
            if proc.poll() is None:
                proc.kill()


def peft_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An adapter's tensors by the model's own names (PEFT's ``base_model.model.`` prefix dropped)."""
    prefix = "base_model.model."
    return {k.removeprefix(prefix): v for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
