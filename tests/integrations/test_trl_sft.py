"""examples/trl_sft.py (LoraDistMixin + TRL's SFTTrainer): 2 ranks == 1 process, and PEFT loads the adapter."""

from __future__ import annotations

import pytest
import torch

from common import assert_same_adapter, python
from distutil import REPO, ranks
from lora_dist.demo import write_demo_data

pytestmark = pytest.mark.dist

EXAMPLE = str(REPO / "examples" / "trl_sft.py")
#: Four prompt/completion records and a global batch of four: every step sees them all, on any world size.
SAME_BATCH = ["--examples", "4", "--global-batch", "4", "--steps", "3"]


def test_sft_two_ranks_equal_one_process_and_the_adapter_loads_in_peft(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_checkpoint("llama", hidden=64, layers=2)
    data = write_demo_data(tmp_path / "sft.jsonl", n=20, kind="prompt_completion")
    python(EXAMPLE, str(base), str(data), str(tmp_path / "one"), "--strategy", "none", *SAME_BATCH)
    two = ranks(2, EXAMPLE, str(base), str(data), str(tmp_path / "two"), "--strategy", "fsdp2", *SAME_BATCH)
    assert_same_adapter(tmp_path / "one" / "adapter", tmp_path / "two" / "adapter")
    # The example turns SFTConfig's activation checkpointing off by its current name: no deprecation in its log.
    assert "checkpointing` is deprecated" not in two.stderr, two.stderr[-2000:]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(tmp_path / "two" / "adapter"))
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain, atol=1e-6)
