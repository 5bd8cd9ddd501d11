"""The comparison every distributed test makes against one process (tests/distutil.py, docs/testing.md#tolerances)
passes what summation order alone makes and fails what a defect makes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from distutil import adapter_atol, assert_same_adapter

ATOL = adapter_atol(5e-3, 3)  # 5e-5


def _adapters(tmp_path, change) -> tuple:
    g = torch.Generator().manual_seed(0)
    want = {f"layers.{i}.q_proj.lora_{ab}.weight": torch.randn(8, 16, generator=g) * 0.02
            for i in range(2) for ab in "AB"}
    got = {k: change(k, v.clone()) for k, v in want.items()}
    dirs = []
    for name, tensors in (("want", want), ("got", got)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
        dirs.append(tmp_path / name)
    return dirs


def _lone(k, t):  # one element Adam moved further (a near-zero gradient's sign), every other at rounding level
    t += 1e-9
    if k == "layers.1.q_proj.lora_A.weight":
        t[3, 5] += 0.64 * ATOL
    return t


def test_a_lone_element_moved_by_the_summation_order_passes(tmp_path):
    assert_same_adapter(*_adapters(tmp_path, _lone), ATOL)


@pytest.mark.parametrize("change,match", [
    (lambda k, t: t + 0.2 * ATOL if k.endswith("0.q_proj.lora_B.weight") else t, "too close to call"),  # a tensor off
    (lambda k, t: t.index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(1.0), accumulate=True), "Mismatched"),
    (lambda k, t: t * 0 if "lora_B" in k else t, "Mismatched"),  # untrained against trained
])
def test_what_a_defect_makes_fails(tmp_path, change, match):
    with pytest.raises(AssertionError, match=match):
        assert_same_adapter(*_adapters(tmp_path, change), ATOL)


def test_two_untrained_adapters_fail(tmp_path):
    untrained = lambda k, t: t * 0 if "lora_B" in k else t  # noqa: E731
    want, got = _adapters(tmp_path, untrained)
    with pytest.raises(AssertionError):
        assert_same_adapter(got, got, ATOL)
