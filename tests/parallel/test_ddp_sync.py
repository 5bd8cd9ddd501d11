"""The ddp and DeepSpeed zero1/2 engines broadcast the LoRA from rank 0, never the frozen base: every rank loaded the
same base from the files, and a 70B bf16 base is 140 GB to broadcast at every start."""

from __future__ import annotations

import json

import pytest

from distutil import ranks

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("strategy,wrapped", [("ddp", "DistributedDataParallel"), ("zero1", "DeepSpeedEngine"),
                                              ("zero2", "DeepSpeedEngine")])
def test_broadcasts_the_lora_and_leaves_the_base_and_buffers_alone(strategy, wrapped):
    out = ranks(2, "tests/dist_scripts/ddp_sync.py", strategy)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s["wrapped"] for s in seen] == [wrapped] * 2
    assert [s["lora_A"] for s in seen] == [[1.0], [1.0]]  # rank 0's LoRA on both: the ranks start alike
    assert [s["base"] for s in seen] == [[0.0], [1.0]]  # each rank's own (frozen) base: not broadcast
    assert [s["buffer"] for s in seen] == [[0.0], [1.0]]  # nor the buffers, at the start or at a forward
