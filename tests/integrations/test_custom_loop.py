"""examples/custom_loop.py (lora_dist.prepare + the engine): W ranks == 1 process == `lora-dist train`."""

from __future__ import annotations

import pytest

from common import assert_same_adapter, python
from distutil import REPO, ranks

pytestmark = pytest.mark.dist

EXAMPLE = str(REPO / "examples" / "custom_loop.py")


def test_one_process_equals_lora_dist_train(loop_setup):
    out = loop_setup["root"] / "custom-one"
    python(EXAMPLE, str(loop_setup["base"]), str(loop_setup["data"]), str(out), "none")
    assert_same_adapter(loop_setup["ref"] / "adapter", out / "adapter", atol=1e-6)
    assert (out / "merged" / "config.json").is_file()


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_two_ranks_equal_lora_dist_train(loop_setup, strategy):
    out = loop_setup["root"] / f"custom-{strategy}"
    ranks(2, EXAMPLE, str(loop_setup["base"]), str(loop_setup["data"]), str(out), strategy)
    assert_same_adapter(loop_setup["ref"] / "adapter", out / "adapter")
    merged = sorted(p.name for p in (out / "merged").iterdir())
    assert "config.json" in merged and any(n.endswith(".safetensors") for n in merged)
