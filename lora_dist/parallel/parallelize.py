"""``parallelize``: the one place a model is wrapped for its strategy, in a fixed order.

compiled blocks (:mod:`~lora_dist.parallel.compile`, ``parallel.compile``) or else selective recompute, and
activation checkpointing (:mod:`~lora_dist.parallel.checkpointing`) -> FSDP2
``fully_shard`` per transformer block (``parallel.shard_unit=weight``: each
weight matrix of a block its own unit first, :func:`weight_units`), then
the input embedding and output head as their own units, then the root, all on
one data-parallel mesh (:func:`dp_mesh_shape`): 1-D over every rank, or 2-D
``(dp_replicate, dp_shard)`` for hybrid sharding (HSDP: ``(Replicate, Shard(0))``,
the base sharded within a group of consecutive ranks, a node, and replicated
across groups, so that the base's all-gathers stay inside a node). LoRA
params are ``ignored_params``: they stay plain, whole tensors on every rank
(their gradients are reduce-scattered into the sharded AdamW over the LoRA,
:class:`~lora_dist.parallel.sharded_adamw.ShardedAdamW`, the default over several ranks; or all-reduced by
:class:`~lora_dist.parallel.reducer.LoRAGradReducer` with ``parallel.shard_optimizer=false``),
while the frozen base becomes ``Shard(0)`` DTensors with no gradients and no
optimizer state. DeepSpeed ZeRO shards at construction instead
(:func:`lora_dist.parallel.deepspeed.zero_init`), so for ``zero*``, ``ddp`` and
``none`` only the compile and recompute settings are applied here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.blocks import find_blocks
from lora_dist.config import ParallelConfig, fsdp2_only_defaults
from lora_dist.errors import ConfigError
from lora_dist.lora import lora_parameters
from lora_dist.nf4 import is_quantized
from lora_dist.parallel.checkpointing import enable_activation_checkpointing, enable_selective_recompute
from lora_dist.parallel.compile import compile_blocks

log = logging.getLogger("lora_dist")

__all__ = ["as_replicated", "dp_mesh_shape", "embedding_and_head", "fsdp2_units", "one_post_forward_mesh",
           "parallelize", "replicated_if_unsharded", "reshard_size", "unit_reshard", "weight_units"]


def dp_mesh_shape(cfg: ParallelConfig, world_size: int) -> tuple[int, int]:
    """``(dp_replicate, dp_shard)`` for ``world_size`` ranks: ``parallel.dp_replicate`` / ``parallel.dp_shard``,
    each 0 (unset) taking what the other leaves; both unset: ``(1, world_size)``, the base sharded over all ranks.

    Raises:
        ConfigError: the product is not ``world_size``.
    """
    replicate, shard = cfg.dp_replicate, cfg.dp_shard
    if not replicate:
        replicate = world_size // shard if shard and world_size % shard == 0 else 1
    if not shard:
        shard = world_size // replicate if world_size % replicate == 0 else 0
    if replicate * shard != world_size:
        raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} x parallel.dp_shard={cfg.dp_shard} must "
                          f"multiply to the {world_size} ranks launched (0: whatever the other leaves)")
    return replicate, shard


def replicated_if_unsharded(cfg: ParallelConfig, world_size: int, base_dtype: str = "float32") -> ParallelConfig:
    """``cfg``, or where it is fsdp2 over one shard rank (one process, or ``parallel.dp_shard=1``), the replicated
    strategy that runs the same math: ``none`` on one rank, else ``ddp`` (the base whole on every rank, LoRA
    gradients reduced, the optimizer state sharded alike). FSDP2 there shards nothing, yet copies every weight
    in and out of its unit buffers each step (docs/bench.md measures what that costs). fsdp2 stays where it
    does what ddp does not: ``parallel.cpu_offload`` (host-resident shards) or ``parallel.mixed_precision=bfloat16``
    over a ``base_dtype`` (``model.dtype``) base that is not bf16 already (FSDP2's cast of the base). torchtitan,
    too, applies FSDP only over more than one shard rank.

    Raises:
        ConfigError: ``dp_replicate x dp_shard`` is not ``world_size``.
    """
    casts = cfg.mixed_precision == "bfloat16" and base_dtype != "bfloat16"
    if cfg.strategy != "fsdp2" or cfg.cpu_offload or casts:
        return cfg
    if dp_mesh_shape(cfg, world_size)[1] != 1:
        return cfg
    return as_replicated(cfg, world_size)


def as_replicated(cfg: ParallelConfig, world_size: int) -> ParallelConfig:
    """``cfg`` run replicated on ``world_size`` ranks: ``none`` on one rank, else ``ddp``, with the fsdp2-only keys
    (``dp_replicate``, ``dp_shard``, ``reshard_after_forward``, ``shard_unit``, ``cpu_offload``) back to their
    defaults, as the other strategies refuse them (a run's ``config.json`` is read back through that check)."""
    return dataclasses.replace(cfg, strategy="ddp" if world_size > 1 else "none", **fsdp2_only_defaults())


def reshard_size(cfg: ParallelConfig, shard: int, local_world_size: int) -> bool | int:
    """FSDP2's ``reshard_after_forward`` for blocks sharded over ``shard`` ranks: ``parallel.reshard_after_forward``,
    with ``node`` the ranks of a node; a rank count N keeps a 1/N shard after forward (N >= ``shard``: ``True``,
    N = 1: ``False``).

    Raises:
        ConfigError: N does not divide ``shard``.
    """
    value = cfg.reshard_after_forward
    if isinstance(value, bool):
        return value
    n = local_world_size if value == "node" else int(value)
    if n >= shard or n < 1:  # n < 1: the node's ranks are not known
        return True
    if n <= 1:
        return False
    if shard % n:
        raise ConfigError(f"parallel.reshard_after_forward={value} ({n} ranks) must divide the {shard} ranks the "
                          "base is sharded over")
    return n


def unit_reshard(params, reshard: bool | int, quantized) -> bool | int:
    """``reshard_after_forward`` for an FSDP2 unit of ``params``: ``reshard``, but ``True`` for a size where one of
    them is ``quantized`` (NF4). FSDP2 (torch 2.13-2.15) rebuilds a weight resharded to a smaller mesh from one
    all-gather output, and an NF4 weight has three (data, block scales and their scale): it fails after the
    first forward. The planner models the same choice."""
    if isinstance(reshard, bool):
        return reshard
    return True if any(quantized(q) for q in params) else reshard


def fsdp2_units(blocks, embed: nn.Module | None, head: nn.Module | None, shard_unit: str, ignored,
                reshard: bool | int, quantized) -> list[tuple[nn.Module, list[nn.Parameter], bool | int]]:
    """The FSDP2 units :func:`parallelize` makes before the root, in its order: per block its weights' units
    (``shard_unit=weight``, :func:`weight_units`) then the block, then the input embedding and the output head
    (``None`` where tied or absent). Each with the params it takes (those no earlier unit took, none ``ignored``)
    and its ``reshard_after_forward`` (:func:`unit_reshard`; the head never: it runs last in forward and first in
    backward). Chosen before any unit is made, as ``fully_shard`` replaces the params it takes; the planner counts
    the same units."""
    units = [(unit, reshard) for block in blocks
             for unit in (*(weight_units(block, ignored) if shard_unit == "weight" else ()), block)]
    units += [(module, after) for module, after in ((embed, reshard), (head, False)) if module is not None]
    taken, out = set(ignored), []
    for module, after in units:
        params = [q for q in module.parameters() if q not in taken]
        taken.update(params)
        out.append((module, params, unit_reshard(params, after, quantized)))
    return out


@contextlib.contextmanager
def one_post_forward_mesh():
    """Within it, FSDP2 units resharded after forward to the same integer size share one post-forward mesh.

    FSDP2 builds a new ``DeviceMesh`` - new process groups, on GPUs new NCCL communicators with their
    buffers - in every ``fully_shard`` call given an integer ``reshard_after_forward``: two per unit, so
    hundreds for an 80-block model. Their layout is the same for every unit of one mesh, so the first is
    reused. Where torch's private helper is not there (another release), nothing is patched: correct, with
    more groups.
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_init, _fully_shard

    real = getattr(_fsdp_init, "_get_post_forward_mesh_info", None)
    if real is None:
        yield
        return
    modules = [m for m in (_fsdp_init, _fully_shard) if getattr(m, "_get_post_forward_mesh_info", None) is real]
    made: dict = {}

    def shared(reshard_after_forward, mesh_info):
        if isinstance(reshard_after_forward, bool):
            return real(reshard_after_forward, mesh_info)
        key = (reshard_after_forward, id(mesh_info.mesh), getattr(mesh_info, "shard_mesh_dim", None))
        if key not in made:
            made[key] = (real(reshard_after_forward, mesh_info), mesh_info.mesh)  # the mesh kept: its id stays
        return made[key][0]

    for module in modules:
        module._get_post_forward_mesh_info = shared
    try:
        yield
    finally:
        for module in modules:
            module._get_post_forward_mesh_info = real


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Compile the blocks (``parallel.compile``) or apply selective recompute, apply activation checkpointing,
    then shard the frozen base (fsdp2), in place.

    Call after :func:`lora_dist.lora.inject_lora` and before materialization:
    the model may live on the meta device. For ``zero*``, ``ddp`` and ``none``
    only the compile and recompute settings are applied here.

    Raises:
        ValueError: fsdp2 (or ``parallel.compile``) found no transformer block.
    """
    blocks = find_blocks(model)
    if cfg.compile:
        compile_blocks(blocks)  # the compiler recomputes cheap work itself: no selective recompute in the blocks
    elif cfg.selective_recompute:
        enable_selective_recompute(model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model, offload=cfg.offload_activations, every=cfg.activation_checkpointing)
    if cfg.strategy != "fsdp2":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    replicate, shard_ranks = dp_mesh_shape(cfg, dist.get_world_size())
    if replicate == 1:
        mesh = init_device_mesh(device.type, (shard_ranks,), mesh_dim_names=("dp_shard",))
    else:
        mesh = init_device_mesh(device.type, (replicate, shard_ranks), mesh_dim_names=("dp_replicate", "dp_shard"))
    # ``node`` is a rank count by now where the launch says how many ranks a node runs
    # (lora_dist.session.resolve_hybrid); left as ``node``, the blocks reshard fully.
    reshard = reshard_size(cfg, shard_ranks, 0)
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cfg.mixed_precision == "bfloat16" else None,
        reduce_dtype=torch.float32,
    )
    # Base shards live in host memory and are copied to the device for each unit's all-gather. On CPU
    # they are there already; the policy still applies (and is tested), without pinned memory.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    ignored = set(lora_parameters(model))
    if shard_ranks == 1:
        # Over one shard rank FSDP2 skips the all-gather and rebuilds each param from its first all-gather input
        # alone, which cannot rebuild an NF4 weight (three inputs): NF4 weights stay whole, as under `none`.
        ignored |= {p for p in model.parameters() if is_quantized(p)}
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no transformer blocks to shard; use parallel.strategy=ddp")
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    embed, head = embedding_and_head(model)
    # Input embedding and output head are often the largest tensors: their own units, so only one of them is
    # gathered at a time. Tied ones share a parameter and must stay in one unit (the root).
    units = fsdp2_units(blocks, embed, head, cfg.shard_unit, ignored, reshard, is_quantized)
    with one_post_forward_mesh():
        for module, _, after in units:
            fully_shard(module, reshard_after_forward=after, **shard)
    full = 0 if isinstance(reshard, bool) else sum(after is True for _, _, after in units)
    if full and dist.get_rank() == 0:
        log.info("parallel.reshard_after_forward=%s: %d FSDP2 units holding NF4 weights reshard fully after "
                 "forward (FSDP2 cannot keep an NF4 weight on %d ranks)", cfg.reshard_after_forward, full, reshard)
    if embed is not None:
        # The frozen embedding's weight is not needed in backward (token ids have no gradient): without
        # this, the first block's backward prefetch gathers the whole embedding again for nothing.
        embed.set_unshard_in_backward(False)
    # The root keeps what is left (final norm); backward needs it first, so no reshard after forward.
    fully_shard(model, reshard_after_forward=False, **shard)
    return model


def weight_units(block: nn.Module, ignored: set[nn.Parameter] = frozenset()) -> list[nn.Module]:
    """``parallel.shard_unit=weight``: the modules of ``block`` that hold a base weight matrix (a linear layer's
    weight, a fused expert stack) themselves, each its own FSDP2 unit; the block's unit keeps the rest (norms)."""
    return [m for m in block.modules() if m is not block
            and any(q.dim() >= 2 and q not in ignored for q in m.parameters(recurse=False))]


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
