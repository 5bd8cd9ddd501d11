"""`lora-dist train` under real launchers gives the single-process result: mpiexec (MPICH + mpi4py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distutil import REPO, lora_dist, quiet_env
from lora_dist.demo import write_demo_data

pytestmark = pytest.mark.dist

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install mpich mpi4py)")
def test_mpiexec_two_rank_training_equals_one_process(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    data = write_demo_data(tmp_path / "data.jsonl", n=100)
    common = [f"model.path={base}", f"data.path={data}", "train.steps=3", "train.seq_len=32", "train.lr=5e-3",
              "data.eval_fraction=0", "lora.r=4"]
    lora_dist("train", *common, f"output.dir={tmp_path / 'ref'}", "parallel.strategy=none", "train.micro_batch_size=4")
    env = quiet_env()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "lora_dist.cli", "train", *common,
         f"output.dir={tmp_path / 'mpi'}", "parallel.strategy=fsdp2", "train.micro_batch_size=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "mpi" / "adapter" / "adapter_model.safetensors"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0)
