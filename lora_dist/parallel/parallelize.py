"""``parallelize``: the one place a model is wrapped for its strategy, in a fixed order.

activation checkpointing -> FSDP2 ``fully_shard`` per transformer block, then
the input embedding and output head as their own units, then the root. LoRA
params are ``ignored_params``: they stay plain, whole tensors on every rank
(their gradients are reduced by :class:`~lora_dist.parallel.reducer.LoRAGradReducer`),
while the frozen base becomes ``Shard(0)`` DTensors with no gradients and no
optimizer state. DeepSpeed ZeRO shards at construction instead
(:func:`lora_dist.parallel.deepspeed.zero_init`), so for ``zero*``, ``ddp`` and
``none`` only activation checkpointing is applied here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.config import ParallelConfig
from lora_dist.lora import lora_parameters

__all__ = ["embedding_and_head", "find_blocks", "parallelize"]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (HF's ``_no_split_modules`` classes, else the largest ModuleList)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def _enable_activation_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError("parallel.activation_checkpointing needs a Hugging Face model; set it to false")
    # Non-reentrant checkpointing recomputes each block and keeps parameter names unchanged.
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Apply activation checkpointing, then shard the frozen base (fsdp2), in place.

    Call after :func:`lora_dist.lora.inject_lora` and before materialization:
    the model may live on the meta device. For ``zero*``, ``ddp`` and ``none``
    only activation checkpointing is applied here.

    Raises:
        ValueError: fsdp2 found no transformer block to shard.
    """
    if cfg.activation_checkpointing:
        _enable_activation_checkpointing(model)
    if cfg.strategy != "fsdp2":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cfg.mixed_precision == "bfloat16" else None,
        reduce_dtype=torch.float32,
    )
    # Base shards live in host memory and are copied to the device for each unit's all-gather. On CPU
    # they are there already; the policy still applies (and is tested), without pinned memory.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    ignored = set(lora_parameters(model))
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no transformer blocks to shard; use parallel.strategy=ddp")
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    for block in blocks:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **shard)
    # Input embedding and output head are often the largest tensors: their own units, so only one
    # of them is gathered at a time. Tied ones share a parameter and must stay in one unit (the root).
    # The head runs last in forward and first in backward: resharding it in between would only
    # gather it again at once.
    embed, head = embedding_and_head(model)
    for module, reshard in ((embed, cfg.reshard_after_forward), (head, False)):
        if module is not None:
            fully_shard(module, reshard_after_forward=reshard, **shard)
    # The root keeps what is left (final norm); backward needs it first, so no reshard after forward.
    fully_shard(model, reshard_after_forward=False, **shard)
    return model


def embedding_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The input embedding and output head FSDP2 wraps as their own units; each ``None`` where absent,
    tied (then both stay in the root unit) or parameterless."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embed is not None and head is not None and embed.weight is head.weight:
        return None, None
    own = lambda m: m if isinstance(m, nn.Module) and any(True for _ in m.parameters()) else None  # noqa: E731
    return own(embed), own(head)
