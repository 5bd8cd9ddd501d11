"""Which bytes of a base tensor this rank owns: one rule for the sharded load and the export.

A frozen base weight is held in one of three ways:

* a plain tensor: whole on every rank (``ddp``, ``zero1/2``, ``none``, and
  FSDP2/ZeRO-3 params small enough to stay whole);
* an FSDP2 ``Shard(0)`` DTensor: a contiguous block of rows, as ``torch.chunk``
  cuts them over the mesh; under hybrid sharding (HSDP, ``(Replicate, Shard(0))``
  on a ``dp_replicate x dp_shard`` mesh) the block of the rank's ``dp_shard``
  coordinate, held by one rank of every replica group;
* a ZeRO-3 partition: rank ``r`` of the param's process group holds flat
  elements ``[r * P, (r + 1) * P)`` of the row-major tensor, the last one padded.

Both sharded forms are one contiguous range of the row-major flattened tensor,
so :func:`owned_range` describes them alike: the loader reads exactly that
range from the safetensors files, the export merges and writes exactly that range.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lora_dist.errors import UserError

__all__ = [
    "OwnedRange",
    "ShardingError",
    "full_shape",
    "gathered",
    "is_dtensor",
    "local_dtype",
    "owned_range",
    "row_shard",
    "stand_in",
    "vocab_sharding_pays",
    "whole_local",
]


class ShardingError(UserError, ValueError):
    """A param held in a way this rule does not cover (another placement, or offloaded to NVMe)."""


@dataclass(frozen=True)
class OwnedRange:
    """Flat elements ``[start, end)`` of the row-major full tensor, held by this rank in ``local``.

    ``local`` is a flat view of the rank's own storage (writes go to the param), with
    ``end - start`` elements; it is empty where the rank owns nothing of the tensor.
    ``primary`` is False on every replica of a replicated shard but the first (hybrid
    sharding: ``dp_replicate`` coordinate 0): all load their range, one writes it.
    """

    start: int
    end: int
    local: torch.Tensor
    primary: bool = True

    def written(self) -> "OwnedRange":
        """The part of the range this rank writes out (the export): all of it on the primary replica, none on
        the others, so every element is written exactly once."""
        return self if self.primary else OwnedRange(self.start, self.start, self.local[:0], False)


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor, whichever way it is sharded."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def local_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype this rank stores the param in."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.dtype
    return param.to_local().dtype if is_dtensor(param) else param.dtype


def whole_local(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a param every rank holds whole (plain, or a replicated DTensor)."""
    return param.to_local() if is_dtensor(param) else param.data


def owned_range(param: torch.Tensor) -> OwnedRange | None:
    """The range of ``param`` this rank owns, or None where the rank holds it whole.

    Raises:
        ShardingError: a DTensor placement other than ``Shard(0)``/``Replicate``, or a
            ZeRO-3 partition that is not in memory.
    """
    shape = full_shape(param)
    numel = math.prod(shape)
    if is_dtensor(param):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if all(isinstance(p, Replicate) for p in param.placements):
            return None
        if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in param.placements):
            raise ShardingError(f"placements {param.placements} are not supported: lora_dist handles dim-0 sharding "
                                "(FSDP2's default Shard(0)) and replication")
        local = param.to_local()
        coordinate = param.device_mesh.get_coordinate() or []
        primary = all(c == 0 for c, p in zip(coordinate, param.placements) if isinstance(p, Replicate))
        if not shape:
            return OwnedRange(0, 1, local.reshape(1), primary)
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        row_len = math.prod(shape[1:])
        rows = local_shape[0]
        start = offset[0] * row_len if rows else 0
        return OwnedRange(start, start + rows * row_len, local.reshape(-1), primary)
    if hasattr(param, "ds_tensor"):
        group = getattr(param, "ds_process_group", None)
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        part = param.ds_tensor.reshape(-1)
        if part.numel() * world < numel:
            raise ShardingError("this rank's ZeRO-3 partition is not in memory (NVMe offload?); "
                                "lora_dist needs the partitions in GPU or CPU memory")
        start = min(rank * part.numel(), numel)
        end = min(start + part.numel(), numel)
        return OwnedRange(start, end, part[: end - start])
    return None


def row_shard(weight: torch.Tensor):
    """A 2-D weight FSDP2 shards by rows (one ``Shard(0)`` mesh dim; under hybrid sharding the other replicates):
    ``(its local rows, the first one's row index, the shard dim's process group)``; None for any other weight.
    The output head's loss and the input embedding's lookup run on such vocabulary shards."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor) or weight.dim() != 2:
        return None
    dims = [d for d, p in enumerate(weight.placements) if isinstance(p, Shard)]
    if len(dims) != 1 or weight.placements[dims[0]].dim != 0:
        return None
    return weight.to_local(), owned_range(weight).start // weight.shape[1], weight.device_mesh.get_group(dims[0])


def vocab_sharding_pays(vocab: int, ranks: int, tokens: int) -> bool:
    """Whether leaving a vocabulary-sized weight (the output head, the input embedding) on its row shards holds less
    than gathering it: the ranks then exchange ``ranks x tokens`` rows of its width (hidden states and their
    gradient, or looked-up rows) instead of the ``vocab`` rows. True for real vocabularies (a 128k head against
    8 x 1024 tokens); false for a tiny vocabulary and long batches."""
    return vocab > ranks * tokens


@contextlib.contextmanager
def stand_in(model: torch.nn.Module, child: torch.nn.Module, replacement: torch.nn.Module):
    """Within it, ``replacement`` takes ``child``'s place in ``model`` (the module tree FSDP2 wrapped); ``child`` is
    put back after, whatever happens. The vocabulary-shard paths run their forward this way without the child's
    FSDP2 hooks (no gather)."""
    for parent in model.modules():
        name = next((attr for attr, sub in parent.named_children() if sub is child), None)
        if name is not None:
            break
    else:
        raise ValueError(f"{type(child).__name__} is not a submodule of {type(model).__name__}")
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, child)


def gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Collective: within it, every ZeRO-3 partitioned param of ``params`` is whole on every rank (read-only).

    DTensors are not touched (``full_tensor()`` them); plain params already are whole.
    """
    zero = [p for p in params if hasattr(p, "ds_id")]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=None)
