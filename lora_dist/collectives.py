"""torch.distributed's one-tensor all-gather and reduce-scatter, under the names the running torch wants.

torch deprecates ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (2.13 and 2.14 print a FutureWarning per call
site) for ``all_gather_single`` and ``reduce_scatter_single``, which take the same arguments; a torch without the new
names gets the old ones. The function is looked up on ``torch.distributed`` at each call, so whatever wraps it there (the
tests' recorders, the benchmark's byte counters) sees lora_dist's calls as it sees FSDP2's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_single", "reduce_scatter_single"]


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """Every rank's ``input`` (same shape on each), concatenated in rank order along dim 0, into ``output``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM, group=None,
                          async_op: bool = False):
    """The ``op`` of every rank's ``input``; this rank keeps its 1/W slice of dim 0 in ``output``."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, input, op=op, group=group, async_op=async_op)
