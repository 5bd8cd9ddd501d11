"""The input embedding left sharded under FSDP2: each rank looks up every rank's tokens in its own vocabulary rows.

FSDP2 makes the input embedding its own unit (:func:`lora_dist.parallel.parallelize`) and all-gathers it at
the start of every forward: at a 128k vocabulary and width 8192 that is 2.1 GB in bf16 held at once (the 70B
example's peak, at forward's start) and 1.8 GB per rank on the wire, to look up a few thousand rows. The
embedding is frozen and its ``Shard(0)`` DTensor already splits the vocabulary over the shard group, so
:class:`ShardedEmbedding` does what the output head's loss does (:class:`lora_dist.loss.ShardedHeadLoss`):

* the ranks all-gather their token ids (integers: a few KB);
* each rank looks up, for every rank's tokens, the ones in its own rows (an NF4 embedding dequantizes only
  those rows: :func:`lora_dist.nf4.embedding_rows`), zeros elsewhere;
* a reduce-scatter sums the shards' rows into each rank's own tokens: exactly one rank contributes each
  token's row and the others zeros, so the result is bit for bit the gathered lookup.

What is held is ``ranks x tokens x width`` (the reduce-scatter's input) instead of the embedding, and that is
what crosses the wire; :func:`lora_dist.sharding.vocab_sharding_pays` says where that is less (the vocabulary
outnumbers the shard group's tokens). Token ids have no gradient and the weight none either: backward does
nothing here. It applies to a plain ``nn.Embedding`` forward without ``max_norm`` (Gemma's scaled embedding
and other forwards of their own keep the gather), and steps aside for a forward where someone else's hook is
on the embedding (TRL's NEFTune).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.collectives import all_gather_single, reduce_scatter_single
from lora_dist.nf4 import embedding_rows
from lora_dist.sharding import row_shard, stand_in

__all__ = ["ShardedEmbedding", "lookup", "plain_lookup", "sharded_embedding"]


def sharded_embedding(model: nn.Module):
    """The input embedding's vocabulary shard under FSDP2: ``(weight, vocab_start, group)``, the local rows of this
    rank; None where the embedding is not its own ``Shard(0)`` FSDP2 unit with the plain lookup (ddp, ZeRO, a
    tied embedding, a forward of its own)."""
    get = getattr(model, "get_input_embeddings", None)
    return _shard(get() if callable(get) else None)


def _shard(embed: nn.Module | None):
    """:func:`sharded_embedding` of the embedding module itself."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(embed, FSDPModule) or not plain_lookup(embed) or embed.weight.requires_grad:
        return None
    embed.reshard()  # a forward outside training (generation) may have left it gathered
    return row_shard(embed.weight)


def plain_lookup(embed: nn.Module | None) -> bool:
    """Whether ``embed``'s forward is ``nn.Embedding``'s lookup alone (no ``max_norm``, no forward of its own in a
    subclass; FSDP2's wrapper class adds none)."""
    if not isinstance(embed, nn.Embedding) or embed.max_norm is not None:
        return False
    for klass in type(embed).__mro__:
        if klass is nn.Embedding:
            return True
        if "forward" in vars(klass):
            return False
    return False


def _foreign_hooks(embed: nn.Module) -> bool:
    """Whether a forward hook other than FSDP2's own is registered on ``embed``."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    hooks = [*embed._forward_pre_hooks.values(), *embed._forward_hooks.values()]
    return any(not isinstance(getattr(h, "__self__", None), FSDPState) for h in hooks)


def lookup(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int, group,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.embedding(ids, W)`` of the whole ``W`` whose rows ``[vocab_start, vocab_start + len(weight))`` this rank
    holds as ``weight``, in ``dtype`` (default the weight's); collective over ``group`` (every rank passes its own
    ids)."""
    dtype = dtype or weight.dtype
    world = dist.get_world_size(group)
    flat = ids.reshape(-1)
    count = torch.tensor([flat.numel()], device=ids.device)
    counts = count.repeat(world)  # the gather overwrites it (what a fake process group leaves: this rank's)
    all_gather_single(counts, count, group=group)
    n = int(counts.max())  # the host's one wait for the device here: the exchange's size (as the head's loss)
    every = flat.new_empty(world * n)
    all_gather_single(every, nn.functional.pad(flat, (0, n - flat.numel()), value=-1), group=group)
    local = every - vocab_start
    mine = (local >= 0) & (local < weight.shape[0])
    rows = torch.zeros((world * n, weight.shape[1]), dtype=dtype, device=ids.device)
    if weight.device != ids.device:
        # parallel.cpu_offload: the shard stays in host memory and the lookup runs there; only this rank's rows
        # travel (the ids' copy to the host makes it wait for the device anyway)
        keep = mine.to(weight.device)
        rows[mine] = embedding_rows(weight, local.to(weight.device)[keep]).to(ids.device, dtype)
    elif weight.shape[0]:
        # one rank's tokens at a time (what is looked up, dequantized and cast is a block of rows), each looked up
        # whole (a token not in this shard at row 0) and zeroed where the row is not this rank's: chosen on the
        # device, where a boolean index would make the host wait for it twice
        for start in range(0, world * n, max(n, 1)):
            block = slice(start, start + n)
            found = embedding_rows(weight, local[block].clamp(0, weight.shape[0] - 1))
            rows[block] = found.masked_fill_(~mine[block, None], 0)
    out = rows.new_empty((n, weight.shape[1]))
    reduce_scatter_single(out, rows, group=group)
    return out[:flat.numel()].view(*ids.shape, weight.shape[1])


class _Lookup(nn.Module):
    """Stands in for the embedding during the forward: :func:`lookup` on its vocabulary shard. Holds the embedding
    as its child, so FSDP2 still finds the embedding's unit in the module tree (its hooks never run: it is never
    gathered)."""

    def __init__(self, embed: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.embed, self.dtype = embed, dtype

    @property
    def weight(self) -> torch.Tensor:
        """The embedding's (sharded) weight, for models that read its device or dtype (Llama 4's text model)."""
        return self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight, start, group = _shard(self.embed)
        return lookup(ids, weight, start, group, self.dtype)


class ShardedEmbedding:
    """Within :meth:`installed`, the model's input embedding looks up on the vocabulary shards (collective: every
    rank of the embedding's shard group runs the forward). Make it on the FSDP2-sharded model."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        if sharded_embedding(model) is None:
            raise ValueError("the sharded lookup needs the input embedding sharded as its own FSDP2 unit")
        self.model, self.dtype = model, dtype
        self.embed = model.get_input_embeddings()

    def installed(self) -> contextlib.AbstractContextManager:
        """The embedding's place holds the stand-in; not where a hook of someone else's is on the embedding (TRL's
        NEFTune adds noise to its output): the gathered lookup runs then, with the hook."""
        if _foreign_hooks(self.embed):
            return contextlib.nullcontext()
        return stand_in(self.model, self.embed, _Lookup(self.embed, self.dtype))
