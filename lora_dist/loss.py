"""The training loss through the output head in chunks: the full fp32 logits never exist.

At a 128k vocabulary the logits of a step are its largest activation: (tokens x vocab) in
the compute dtype, again in fp32 for the loss, and once more for their gradient. The head
is frozen (LoRA adapts the blocks), so its backward only needs the gradient of its input.
:class:`ChunkedHeadLoss` makes the model's head return its input (the final hidden states)
and computes ``sum CE(hidden @ W.T + b)`` a chunk of tokens at a time: the peak is
``chunk x vocab`` fp32 instead of ``tokens x vocab``. Each chunk's gradient of the hidden
states is computed in forward, from the logits already in hand (the softmax minus the
one-hot target, times the head), and backward only scales it by the loss's weight: two
head matmuls per step, as for the plain loss, with nothing recomputed.

The head keeps running inside the model's forward, so FSDP2 and ZeRO-3 gather its weight
as they always do: the backward does not need it again. FSDP2 gathers it once. ZeRO-3
partitions it again as the head's forward returns, so the chunks gather it a second time
(a copy kept from the forward would add a whole head to the peak, at its end), and
DeepSpeed's backward hook on the head's output gathers it a third time, unused: one
all-gather of the head per micro-step more than the plain loss (measured on 2 ranks; the
hook cannot be skipped without DeepSpeed asserting in its backward).

It applies where the head's output reaches the loss through linear operations only (the
logit scales of Cohere or Granite are linear and commute with the chunking); a model with
final-logit soft-capping (Gemma-2/3), a LoRA-adapted head or a head that is not a
``Linear`` keeps the plain loss (:func:`chunkable`).

Under FSDP2 the head need not be gathered at all (:class:`ShardedHeadLoss`, the default;
``parallel.gather_head=true`` gathers it as above). Its ``Shard(0)`` DTensor already splits
the vocabulary over the ranks of the shard group, and the frozen head never changes, so
the ranks gather their final hidden states instead (``tokens x hidden``, about 1/16 of a
Llama head per 1024 tokens), each computes the logits of every rank's tokens over its
own vocabulary rows, and two small all-gathers (per-token log-sum-exp and target logit
per shard) give each token's exact cross-entropy. In backward each rank multiplies its
softmax gradient by its rows and a reduce-scatter sums the shards' contributions to each
rank's hidden-state gradient (in fp32); a token's gradient needs the log-sum-exp of every
shard, so here backward recomputes each chunk's logits. At 70B on 8 ranks this removes the 2.1 GB head
from the gathered weights and its all-gather (2 GB per step) from the wire, and a chunk's
logits are ``chunk x vocab / W`` (an NF4 head's: a block wide, below).

An NF4 head (``model.quantize_embeddings``) is dequantized :data:`HEAD_BLOCK_ROWS` vocabulary rows at a time, for
each chunk and again for its gradient: the loss never holds a dequantized copy of the whole head (or head shard).
Left sharded, each such block is used whole where it is decoded: forward keeps each token's log-sum-exp over the
blocks seen so far (a running largest logit and sum of exponentials), and backward, which has the final log-sum-exp,
turns a block's logits into its part of the softmax and multiplies it with the same block. A chunk's fp32 logits are
then one block wide.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lora_dist.chat import IGNORE
from lora_dist.collectives import all_gather_single, reduce_scatter_single
from lora_dist.lora import LoRALinear
from lora_dist.nf4 import dequantize_rows, is_nf4
from lora_dist.sharding import row_shard, stand_in

__all__ = [
    "IGNORE",
    "ChunkedHeadLoss",
    "ShardedHeadLoss",
    "chunkable",
    "linear_cross_entropy_sum",
    "loss_rows",
    "n_targets",
    "sharded_head",
    "token_loss_sum",
]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies in fp32 (labels shifted here, ``-100`` ignored).

    The labels are shifted, not the logits: ``logits[:, :-1]`` of a batch of several sequences is
    not a view of one block, so flattening it would copy the largest activation of the step.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # the last position predicts nothing
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def n_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss (the first position of a sequence predicts nothing)."""
    return int((labels[:, 1:] != IGNORE).sum())


def loss_rows(labels: torch.Tensor) -> torch.Tensor:
    """The positions of ``labels.flatten()`` whose next-token target carries a loss (the rows of the flattened
    hidden states that go through the head). Found where ``labels`` are: on the host copy of a batch's labels
    (:func:`lora_dist.data.batch_inputs` does), so the forward never waits for the GPU to learn them."""
    return (F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten() != IGNORE).nonzero().squeeze(1)


def _gathered(weight: torch.Tensor, bias: torch.Tensor | None):
    """Under ZeRO-3 the head's weight and bias are partitioned outside its forward: gather them for the chunks."""
    params = [p for p in (weight, bias) if p is not None and hasattr(p, "ds_id")]
    if params:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum over this rank's tokens of CE(hidden @ W.T + b, target)`` in fp32, a chunk of tokens at a time; the
    head ``(W, b)`` is frozen.

    ``group`` None: this process holds the whole head, so each chunk's log-sum-exp is final as soon as its
    logits exist: where ``grad`` asks for it, the chunk's gradient of the hidden states (per unit of loss) is
    computed right there, from the logits already in hand, and backward only scales it - no recompute, two
    head matmuls per step instead of three (and under ZeRO-3 no second gather of the head).

    Else every rank of ``group`` holds vocabulary rows ``[vocab_start, vocab_start + len(W))``: the ranks'
    hidden states are gathered (padded to the longest rank's count), each chunk holds the logits of up to
    ``chunk`` of them over a block of this rank's rows (:meth:`_Head.blocks`: all of them, or an NF4 head's rows
    dequantized a block at a time) and keeps their log-sum-exp over the blocks online, and the per-shard
    log-sum-exp and target logits combine into each token's cross-entropy; that needs every chunk's statistics
    from every shard first, so backward recomputes each block's logits, multiplies their part of the softmax with
    the same block, and the shards' gradients of the hidden states are summed in fp32 by a reduce-scatter.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_start, chunk, group, grad):
        if group is None:
            return _LinearCrossEntropy._whole_head(ctx, hidden, weight, bias, targets, chunk, grad)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = hidden.shape[0]
        every, every_targets = hidden, targets
        if world > 1:
            count = torch.tensor([n], device=hidden.device)
            counts = count.repeat(world)  # the gather overwrites it (what a fake process group leaves: this rank's)
            all_gather_single(counts, count, group=group)
            n = int(counts.max())
            every = hidden.new_empty((world * n, hidden.shape[1]))
            all_gather_single(every, F.pad(hidden, (0, 0, 0, n - hidden.shape[0])), group=group)
            every_targets = targets.new_empty(world * n)
            all_gather_single(every_targets, F.pad(targets, (0, n - targets.shape[0]), value=IGNORE),
                              group=group)
        stats = torch.zeros((2, world * n), dtype=torch.float32, device=hidden.device)  # log-sum-exp, target logit
        with _gathered(weight, bias):
            head = _Head(weight, bias, hidden.dtype)
            for _, rows in _chunk_rows(world, n, chunk, hidden.device):
                chunk_targets = every_targets[rows]
                # the log-sum-exp over the blocks of this rank's rows, online: the running largest logit and the sum
                # of exponentials relative to it (no rows: -inf, which the other shards' log-sum-exp ignores)
                top = torch.full((len(rows),), float("-inf"), device=hidden.device)
                norm, target = torch.zeros_like(top), torch.zeros_like(top)
                for cols, w, b in head.blocks():
                    logits = F.linear(every[rows], w, b).float()
                    column, inside = _local_targets(chunk_targets, vocab_start + cols.start, cols.stop - cols.start)
                    target += logits.gather(1, column[:, None]).squeeze(1) * inside
                    new_top = torch.maximum(top, logits.amax(dim=-1))
                    norm = norm * (top - new_top).exp() + logits.sub_(new_top[:, None]).exp_().sum(dim=-1)
                    top = new_top
                    del logits  # in place above: one fp32 block of logits at a time
                stats[0, rows], stats[1, rows] = top + norm.log(), target
        if world > 1:
            shards = stats.new_empty((world * 2, world * n))
            all_gather_single(shards, stats, group=group)
            shards = shards.view(world, 2, world * n)
            lse, target_logit = torch.logsumexp(shards[:, 0], dim=0), shards[:, 1].sum(0)
        else:
            lse, target_logit = stats[0], stats[1]
        per_token = torch.where(every_targets != IGNORE, lse - target_logit, 0.0)
        ctx.save_for_backward(every, every_targets, lse)
        ctx.weight, ctx.bias, ctx.vocab_start, ctx.chunk, ctx.group = weight, bias, vocab_start, chunk, group
        ctx.world, ctx.n, ctx.count = world, n, hidden.shape[0]
        return per_token[rank * n:rank * n + hidden.shape[0]].sum()

    @staticmethod
    def _whole_head(ctx, hidden, weight, bias, targets, chunk, grad):
        """One process, the whole head: loss and (``grad``) the hidden states' gradient in one pass. Every target
        carries a loss (:func:`linear_cross_entropy_sum` leaves the others out), so no pass masks any."""
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if grad else None
        with _gathered(weight, bias):
            head = _Head(weight, bias, hidden.dtype)
            for start in range(0, hidden.shape[0], max(chunk, 1)):
                rows = slice(start, start + max(chunk, 1))
                t = targets[rows]
                logits = head.logits(hidden[rows])
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(dim=-1)
                probs = logits.sub_(top[:, None]).exp_()  # in place: one fp32 chunk
                norm = probs.sum(dim=-1)
                total += (top + norm.log() - target_logit).sum()
                if grad:
                    probs /= norm[:, None]  # the softmax
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    d_hidden[rows] = head.times(probs, hidden.dtype)
                del logits, probs  # before the next chunk's exist
        ctx.save_for_backward(d_hidden)
        ctx.world = 0
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if not ctx.world:  # the whole head: the gradient is there already
            (d_hidden,) = ctx.saved_tensors
            return (_scaled(d_hidden, grad_total), None, None, None, None, None, None, None)
        every, every_targets, lse = ctx.saved_tensors
        world, n, group = ctx.world, ctx.n, ctx.group
        scales = grad_total.reshape(1).float()  # each rank's d(total)/d(its loss sum)
        if world > 1:
            scales = scales.repeat(world)
            all_gather_single(scales, grad_total.reshape(1).float(), group=group)
        row_scale = torch.where(every_targets != IGNORE, scales.repeat_interleave(n), 0.0)
        # One process writes the gradient in the hidden states' dtype; shards sum theirs in fp32 first.
        grad = torch.empty((n, every.shape[1]), dtype=every.dtype if world == 1 else torch.float32,
                           device=every.device)
        with _gathered(ctx.weight, ctx.bias):
            head = _Head(ctx.weight, ctx.bias, every.dtype)
            for start, rows in _chunk_rows(world, n, ctx.chunk, every.device):
                chunk_targets, scale = every_targets[rows], row_scale[rows, None]
                partial = None  # rank r's tokens in block r
                for cols, w, b in head.blocks():
                    probs = F.linear(every[rows], w, b).float().sub_(lse[rows, None]).exp_()  # in place: one fp32 block
                    column, inside = _local_targets(chunk_targets, ctx.vocab_start + cols.start,
                                                    cols.stop - cols.start)
                    # minus one at each target in the block: -0.0 elsewhere (column 0), no change; no boolean
                    # indexing, whose nonzero() would wait for the GPU at every block
                    probs.scatter_add_(1, column[:, None], inside[:, None].to(probs.dtype).neg_())
                    probs *= scale
                    product = probs.to(head.dtype) @ w
                    del probs  # before the next block's exist
                    # several blocks: their products summed in fp32
                    partial = product if partial is None else partial.float().add_(product)
                if partial is None:  # this rank holds no vocabulary rows
                    partial = grad.new_zeros((len(rows), grad.shape[1]))
                partial = partial.to(grad.dtype)
                c = partial.shape[0] // world
                if world > 1:
                    reduce_scatter_single(grad[start:start + c], partial, group=group)
                else:
                    grad[start:start + c] = partial
                del partial  # before the next chunk's exists
        return grad[:ctx.count].to(every.dtype), None, None, None, None, None, None, None


def _scaled(x: torch.Tensor, scale: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``x * scale``, multiplied in fp32 and rounded once to ``x``'s dtype, a block of rows at a time. ``scale`` is
    the step's 1/n_tokens: rounded to bf16 first, it would scale a bf16 run's whole gradient by up to 0.4% off."""
    if x.dtype == torch.float32:
        return x * scale
    out = torch.empty_like(x)
    scale = scale.float()
    for start in range(0, len(x), rows):
        out[start:start + rows] = x[start:start + rows].float() * scale
    return out


#: Vocabulary rows of an NF4 head (model.quantize_embeddings) dequantized at a time for the loss: 16 MB in bf16 at a
#: hidden size of 4096.
HEAD_BLOCK_ROWS = 2048


class _Head:
    """This rank's frozen head rows ``(weight, bias)`` applied in the hidden states' ``dtype``.

    A head stored in another float dtype (fp32 under a 16-bit compute) is cast once, whole, as before. An NF4 head
    of more than one block is dequantized :data:`HEAD_BLOCK_ROWS` vocabulary rows at a time, for each use: the loss
    holds one such block, never a copy of the whole head (at 70B on 8 ranks, a 263 MB bf16 copy of an NF4 head
    shard at the step's peak, against 34 MB). The price is time: each block is dequantized again for every chunk
    of tokens and for the gradient (twice per chunk, once without a gradient, instead of 1-2 times per step), and
    each block's product with the softmax is rounded to ``dtype`` before the fp32 sum. On a GPU decoding a weight
    element may cost about as much as multiplying it with a 1024-token chunk (an estimate; not measured on a GPU):
    a larger ``train.loss_chunk`` spreads it over more tokens.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.dtype, self.rows = dtype, weight.shape[0]
        self.whole = not is_nf4(weight) or self.rows <= HEAD_BLOCK_ROWS
        if self.whole and (is_nf4(weight) or weight.dtype != dtype):  # converted once
            weight = dequantize_rows(weight, 0, self.rows, dtype)
        if self.whole and bias is not None:
            bias = bias.to(dtype)
        self.weight, self.bias = weight, bias

    def blocks(self):
        """``(columns, weight, bias)`` per block of vocabulary rows in ``dtype``: the whole head as one block (none
        where this rank holds no rows), or an NF4 head dequantized :data:`HEAD_BLOCK_ROWS` rows at a time."""
        if self.whole:
            if self.rows:
                yield slice(0, self.rows), self.weight, self.bias
            return
        for start in range(0, self.rows, HEAD_BLOCK_ROWS):
            end = min(start + HEAD_BLOCK_ROWS, self.rows)
            bias = self.bias[start:end].to(self.dtype) if self.bias is not None else None
            yield slice(start, end), dequantize_rows(self.weight, start, end, self.dtype), bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` in fp32, computed in ``dtype``."""
        if self.whole:
            return F.linear(x, self.weight, self.bias).float()
        out = torch.empty((x.shape[0], self.rows), dtype=torch.float32, device=x.device)
        for cols, w, b in self.blocks():
            out[:, cols] = F.linear(x, w, b)
        return out

    def times(self, probs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``probs @ W`` (``probs``: fp32, a column per row of W) multiplied in ``dtype``, in ``out_dtype``; the
        blocks' products are summed in fp32."""
        if self.whole:
            return (probs.to(self.dtype) @ self.weight).to(out_dtype)
        total = torch.zeros((probs.shape[0], self.weight.shape[1]), dtype=torch.float32, device=probs.device)
        for cols, w, _ in self.blocks():
            total += probs[:, cols].to(self.dtype) @ w
        return total.to(out_dtype)


def _local_targets(targets: torch.Tensor, vocab_start: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's row among the ``rows`` vocabulary rows from ``vocab_start`` (a block of this rank's rows; 0
    where it is not one of them), and where it is one (ignored targets never are)."""
    local = targets - vocab_start
    mine = (targets != IGNORE) & (local >= 0) & (local < rows)
    return torch.where(mine, local, 0), mine


def _chunk_rows(world: int, n: int, chunk: int, device: torch.device):
    """``(position, rows)`` per chunk: the rows of ``world`` blocks of ``n`` tokens at positions
    ``[position, position + c)`` of every block, ``world x c <= max(chunk, world)`` rows, ordered by block."""
    step = max(1, chunk // world)
    for start in range(0, n, step):
        c = min(step, n - start)
        rows = (torch.arange(world, device=device)[:, None] * n + torch.arange(start, start + c, device=device))
        yield start, rows.reshape(-1)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, chunk: int, vocab_start: int = 0, group=None,
                             rows: torch.Tensor | None = None) -> torch.Tensor:
    """The summed next-token cross-entropy of ``labels`` (``-100`` ignored) from the final hidden states,
    through a frozen head ``(weight, bias)``, ``chunk`` tokens at a time; fp32.

    ``group`` None: ``weight`` is the whole head. Else a process group whose ranks each hold vocabulary rows
    ``[vocab_start, vocab_start + len(weight))`` (and their ``bias``); every rank calls it with its own tokens
    (collective). Either way, the same value as :func:`token_loss_sum` of the whole head's logits over this
    rank's tokens, with the same gradient for ``hidden``; the head gets none (it is frozen). Only the tokens
    whose label carries a loss go through the head (in chat data the prompts are often half the tokens): the
    others' logits would be computed for nothing, and their gradient is zero. ``rows``: those tokens
    (:func:`loss_rows`, on ``hidden``'s device), found from ``labels`` where not given (on a GPU the host then
    waits for the labels' device to get there).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()  # the last position predicts nothing
    if rows is None:
        rows = loss_rows(labels)
    # the head multiplies only the tokens that carry a loss (prompts, padding, every row's last position: none)
    hidden, targets = hidden.flatten(0, 1).index_select(0, rows), targets.index_select(0, rows)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, vocab_start, chunk, group, grad)


def chunkable(model: nn.Module) -> str | None:
    """Why the chunked loss cannot apply to ``model`` (None when it can)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return "the model has no output head"
    if isinstance(head, LoRALinear):
        return "LoRA adapts the output head"
    if not isinstance(head, nn.Linear):
        return f"the output head is a {type(head).__name__}, not a Linear"
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "output_logits_softcapping"):
        if getattr(config, name, None):
            return f"the model soft-caps its logits ({name})"
    return None


def not_a_view(hidden: torch.Tensor) -> torch.Tensor:
    """What a head stand-in returns for ``hidden``: a copy where it is a view. Hugging Face hands the head a slice of
    the final hidden states (``logits_to_keep``), always a view, and FSDP2 (torch 2.13, 2.14) warns about every view
    an FSDP2 unit returns, the head's and the root model's, since an in-place op on it would drop the backward hook it
    puts there. One copy of batch x tokens x hidden, no new peak: the view kept the whole final hidden states alive."""
    return hidden.clone() if hidden._base is not None else hidden


class ChunkedHeadLoss:
    """Within :meth:`installed`, the model's head returns its input; :meth:`loss_sum` then applies the
    head and the loss in chunks.

    Outside that context the model is untouched (its forward gives logits as always). Make it on
    the unwrapped model, after it is sharded; run the forward through the strategy's wrapper.
    """

    def __init__(self, model: nn.Module, chunk: int) -> None:
        why = chunkable(model)
        if why:
            raise ValueError(f"the chunked loss does not apply: {why}")
        if chunk < 1:
            raise ValueError(f"the loss chunk must be at least 1 token, got {chunk}")
        self.head: nn.Linear = model.get_output_embeddings()
        self.chunk = chunk
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    @contextlib.contextmanager
    def installed(self):
        """The head returns its input (an instance attribute: FSDP2/ZeRO-3 module hooks still run around it)."""
        self.head.forward = self._forward
        try:
            yield
        finally:
            del self.head.forward

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The weight as the strategy presents it inside the forward: gathered (FSDP2), or the
        # partitioned parameter ZeRO-3 gathers again for the chunks.
        self._weight, self._bias = self.head.weight, self.head.bias
        return not_a_view(hidden)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The summed fp32 token loss of the forward (within :meth:`installed`) that returned ``hidden``
        (``rows``: :func:`linear_cross_entropy_sum`'s)."""
        if self._weight is None:
            raise RuntimeError("ChunkedHeadLoss.loss_sum before a forward through the model")
        weight, bias = self._weight, self._bias
        self._weight = self._bias = None
        return linear_cross_entropy_sum(hidden, weight, bias, labels, self.chunk, rows=rows)


# ---------------------------------------------------------------------------- the head left sharded


def sharded_head(model: nn.Module):
    """The output head's vocabulary shard under FSDP2: ``(weight, bias, vocab_start, group)``, local tensors of
    this rank; None where the head is not its own ``Shard(0)`` FSDP2 unit (ddp, ZeRO, a tied head)."""
    from torch.distributed.fsdp import FSDPModule

    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, FSDPModule) or chunkable(model) is not None:
        return None
    head.reshard()  # a forward outside training (generation) may have left it gathered
    shard = row_shard(head.weight)
    if shard is None:
        return None
    weight, start, group = shard
    return weight, (head.bias.to_local() if head.bias is not None else None), start, group


class _SkipHead(nn.Module):
    """Stands in for the head during the forward: returns its input. Holds the head as its child, so FSDP2 still
    finds the head's unit in the module tree (its hooks never run: the head is never gathered)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return not_a_view(hidden)


class ShardedHeadLoss:
    """Within :meth:`installed`, the model's forward stops at the final hidden states and the head is not gathered;
    :meth:`loss_sum` then runs the loss over each rank's vocabulary shard
    (:func:`linear_cross_entropy_sum` over the head's group). Collective: every rank of the head's shard group calls both.

    Make it on the FSDP2-sharded model (:func:`sharded_head` must find the head's shard).
    """

    def __init__(self, model: nn.Module, chunk: int) -> None:
        if sharded_head(model) is None:
            raise ValueError("the sharded head loss needs the output head sharded as its own FSDP2 unit")
        if chunk < 1:
            raise ValueError(f"the loss chunk must be at least 1 token, got {chunk}")
        self.model, self.chunk = model, chunk
        self.head = model.get_output_embeddings()

    def installed(self) -> contextlib.AbstractContextManager:
        """The head's place in the model holds a stand-in that returns its input (the head stays sharded)."""
        return stand_in(self.model, self.head, _SkipHead(self.head))

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The summed fp32 token loss of this rank's ``labels`` from the ``hidden`` a forward within
        :meth:`installed` returned (``rows``: :func:`linear_cross_entropy_sum`'s)."""
        weight, bias, start, group = sharded_head(self.model)
        if weight.device != hidden.device:  # parallel.cpu_offload: the shard lives in host memory, as FSDP2 copies it
            weight = weight.to(hidden.device, non_blocking=True)
            bias = bias.to(hidden.device, non_blocking=True) if bias is not None else None
        return linear_cross_entropy_sum(hidden, weight, bias, labels, self.chunk, start, group, rows)

