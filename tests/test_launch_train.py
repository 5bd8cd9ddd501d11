"""`lora-dist train` under real launchers gives the single-process result.

Each test runs a tiny 2-rank LoRA fine-tune through a real launcher (mpiexec, and the
project's scripts in ``launchers/`` for ``accelerate launch`` and the ``deepspeed``
launcher) and compares the adapter it writes with one single-process reference run: two
ranks with micro batch 2 see the same global batch as one process with micro batch 4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distutil import REPO, assert_same_adapter, free_port, lora_dist, quiet_env
from lora_dist.demo import write_demo_data

pytestmark = pytest.mark.dist

STEPS, LR = 3, 5e-3
ADAPTER_ATOL = LR * STEPS / 300  # as tests/test_train_dist.py: Adam turns summation-order noise into ~lr moves

VENV_BIN = Path(sys.executable).parent
LAUNCHERS = REPO / "launchers"
MPIEXEC = shutil.which("mpiexec", path=str(VENV_BIN))
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "NODE_RANK", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_", "ACCELERATE_")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory) -> tuple[list[str], Path]:
    """(training overrides shared by every run, adapter dir of the single-process run with them)."""
    tmp = tmp_path_factory.mktemp("launch-train")
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    data = write_demo_data(tmp / "data.jsonl", n=100)
    common = [f"model.path={base}", f"data.path={data}", f"train.steps={STEPS}", "train.seq_len=32", f"train.lr={LR}",
              "data.eval_fraction=0", "lora.r=4"]
    lora_dist("train", *common, f"output.dir={tmp / 'ref'}", "parallel.strategy=none", "train.micro_batch_size=4")
    return common, tmp / "ref" / "adapter"


def _launch_env(**extra: str) -> dict[str, str]:
    """A child environment without inherited launcher variables, with this venv's programs first on PATH."""
    env = {k: v for k, v in quiet_env().items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _assert_run_matches(out: Path, ref: Path, strategy: str) -> None:
    """The run in ``out`` used ``strategy`` and wrote the reference adapter: fp32, within ``ADAPTER_ATOL`` with
    a margin (docs/testing.md#tolerances)."""
    assert json.loads((out / "config.json").read_text())["parallel"]["strategy"] == strategy
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_same_adapter(ref, out / "adapter", ADAPTER_ATOL)


def test_torchrun_two_rank_training_equals_one_process(reference, tmp_path):
    """Plain ``torchrun -m lora_dist.cli train`` (the other 2-rank tests fork their ranks: tests/distutil.py)."""
    common, ref = reference
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
          "-m", "lora_dist.cli", "train", *common, f"output.dir={tmp_path / 'run'}", "parallel.strategy=ddp",
          "train.micro_batch_size=2"], _launch_env())
    _assert_run_matches(tmp_path / "run", ref, "ddp")


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install mpich mpi4py)")
def test_mpiexec_two_rank_training_equals_one_process(reference, tmp_path):
    common, ref = reference
    _run([MPIEXEC, "-n", "2", sys.executable, "-m", "lora_dist.cli", "train", *common,
          f"output.dir={tmp_path / 'mpi'}", "parallel.strategy=fsdp2", "train.micro_batch_size=2"], _launch_env())
    _assert_run_matches(tmp_path / "mpi", ref, "fsdp2")


@pytest.mark.parametrize("config, strategy", [
    ("accelerate_fsdp2.yaml", "fsdp2"),
    ("accelerate_deepspeed.yaml", "zero3"),
])
def test_accelerate_launch_two_rank_training_equals_one_process(reference, tmp_path, config, strategy):
    """launchers/accelerate_launch.sh with each shipped config; the strategy comes from the config's content."""
    common, ref = reference
    env = _launch_env(ACCELERATE_CONFIG=str(LAUNCHERS / config), MAIN_PROCESS_PORT=str(free_port()))
    proc = _run(["bash", str(LAUNCHERS / "accelerate_launch.sh"), *common, f"output.dir={tmp_path / 'run'}",
                 "train.micro_batch_size=2"], env)
    assert f"-> parallel.strategy={strategy}" in proc.stderr
    _assert_run_matches(tmp_path / "run", ref, strategy)


def test_deepspeed_hostfile_two_rank_training_equals_one_process(reference, tmp_path):
    """launchers/deepspeed_hostfile.sh over a one-host hostfile (no ssh needed for a single host)."""
    common, ref = reference
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = _launch_env(HOSTFILE=str(hostfile), NO_SSH_CHECK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = _run(["bash", str(LAUNCHERS / "deepspeed_hostfile.sh"), *common, f"output.dir={tmp_path / 'run'}",
                 "parallel.strategy=zero3", "train.micro_batch_size=2"], env)
    launcher_log = proc.stdout + proc.stderr
    assert "WORLD INFO DICT: {'localhost': [0, 1]}" in launcher_log  # the hostfile's 2 slots
    assert "dist_world_size=2" in launcher_log
    _assert_run_matches(tmp_path / "run", ref, "zero3")
