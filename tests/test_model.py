"""Where the model's pieces live (cpu_offload), and DeepSpeed combinations refused before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_dist.config import ConfigError
from lora_dist.lora import LoRAConfig, inject_lora, lora_parameters
from lora_dist.model import place_unsharded
from lora_dist.parallel.deepspeed import check_supported


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("table", torch.arange(4.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_place_unsharded_moves_lora_and_buffers_only():
    """cpu_offload: base shards stay in host memory, LoRA params and buffers go to the run's device.

    The meta device stands in for a GPU: it is a device other than the CPU the shards live on.
    """
    model = WithBuffer()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["proj"]))
    place_unsharded(model, torch.device("meta"))
    assert all(p.device.type == "meta" for p in lora_parameters(model))
    assert all(b.device.type == "meta" for b in model.buffers())
    assert "scratch" not in model.state_dict()  # non-persistent stays non-persistent
    base = [p for p in model.parameters() if not p.requires_grad]
    assert base and all(p.device.type == "cpu" for p in base)
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in lora_parameters(model))


def test_zero3_with_activation_checkpointing_needs_a_fixed_deepspeed():
    with pytest.raises(ConfigError, match=r"deepspeed>=0\.19\.3.*found 0\.18\.2.*activation_checkpointing=false"):
        check_supported("zero3", True, version="0.18.2")
    check_supported("zero3", True, version="0.19.3")
    check_supported("zero3", True, version="0.20.0+abc")
    check_supported("zero3", False, version="0.15.0")
    check_supported("fsdp2", True, version="0.15.0")
