"""The repeated transformer blocks of a model: the unit lora_dist shards (FSDP2), checkpoints, compiles and
quantizes (NF4) one at a time."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["find_blocks"]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (HF's ``_no_split_modules`` classes, else the largest ModuleList)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []
