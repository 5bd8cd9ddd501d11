"""Fixtures of the integration tests: one tiny base, one data file, one `lora-dist train` reference run."""

from __future__ import annotations

import pytest

from common import LORA, LR, STEPS
from distutil import lora_dist
from lora_dist.demo import write_demo_data


@pytest.fixture(scope="session")
def loop_setup(tiny_checkpoint, tmp_path_factory) -> dict:
    """``base``, ``data``, ``root`` and ``ref``: what `lora-dist train` writes in one process with a global batch of
    4 blocks, the settings examples/custom_loop.py and examples/accelerate_loop.py hard-code."""
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    root = tmp_path_factory.mktemp("loops")
    data = write_demo_data(root / "data.jsonl", n=200)
    ref = root / "ref"
    lora_dist("train", f"model.path={base}", f"data.path={data}", f"train.steps={STEPS}", "train.seq_len=32",
              f"train.lr={LR}", "train.warmup_steps=1", "data.eval_fraction=0", *LORA, "checkpoint.every=0",
              "parallel.strategy=none", "train.micro_batch_size=4", f"output.dir={ref}")
    return {"base": base, "data": data, "root": root, "ref": ref}
