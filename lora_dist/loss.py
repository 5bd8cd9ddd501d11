"""The training loss through the output head in chunks: the full fp32 logits never exist.

At a 128k vocabulary the logits of a step are its largest activation: (tokens x vocab) in
the compute dtype, again in fp32 for the loss, and once more for their gradient. The head
is frozen (LoRA adapts the blocks), so its backward only needs the gradient of its input.
:class:`ChunkedHeadLoss` makes the model's head return its input (the final hidden states)
and computes ``sum CE(hidden @ W.T + b)`` a chunk of tokens at a time, recomputing each
chunk's logits in backward: the peak is ``chunk x vocab`` fp32 instead of ``tokens x vocab``.

The head keeps running inside the model's forward, so FSDP2 and ZeRO-3 gather its weight
as they always do: FSDP2 keeps the head gathered from its forward to its backward (it
does not reshard after forward, :func:`lora_dist.parallel.parallelize`), and under ZeRO-3
the backward gathers it again for the chunks' recompute.

It applies where the head's output reaches the loss through linear operations only (the
logit scales of Cohere or Granite are linear and commute with the chunking); a model with
final-logit soft-capping (Gemma-2/3), a LoRA-adapted head or a head that is not a
``Linear`` keeps the plain loss (:func:`chunkable`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_dist.chat import IGNORE
from lora_dist.lora import LoRALinear

__all__ = ["IGNORE", "ChunkedHeadLoss", "chunkable", "linear_cross_entropy_sum", "n_targets", "token_loss_sum"]


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


def _gathered(weight: torch.Tensor):
    """Under ZeRO-3 the head's weight is partitioned outside its forward: gather it for the recompute."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight])
    return contextlib.nullcontext()


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum over tokens of CE(hidden @ weight.T + bias, target)`` in fp32, chunk by chunk; weight frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with _gathered(weight):
            for s in range(0, hidden.shape[0], chunk):
                logits = F.linear(hidden[s:s + chunk], weight, bias).float()
                total += F.cross_entropy(logits, targets[s:s + chunk], ignore_index=IGNORE, reduction="sum")
        ctx.save_for_backward(hidden, targets)
        ctx.weight, ctx.bias, ctx.chunk = weight, bias, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, targets = ctx.saved_tensors
        weight, bias, chunk = ctx.weight, ctx.bias, ctx.chunk
        grad_hidden = torch.empty_like(hidden)
        with _gathered(weight):
            for s in range(0, hidden.shape[0], chunk):
                logits = F.linear(hidden[s:s + chunk], weight, bias).float()
                t = targets[s:s + chunk]
                grad = torch.softmax(logits, dim=-1)
                keep = t != IGNORE
                grad[keep, t[keep]] -= 1.0
                grad[~keep] = 0.0
                grad *= grad_total
                grad_hidden[s:s + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
        return grad_hidden, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed next-token cross-entropy of ``labels`` (``-100`` ignored) from the final hidden states,
    through a frozen head ``(weight, bias)``, ``chunk`` tokens at a time; fp32.

    The same value as :func:`token_loss_sum` of the head's logits, with the same
    gradient for ``hidden``; the head gets none (it is frozen).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # the last position predicts nothing
    return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, bias, targets.flatten(), chunk)


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
        return hidden

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed fp32 token loss of the forward (within :meth:`installed`) that returned ``hidden``."""
        if self._weight is None:
            raise RuntimeError("ChunkedHeadLoss.loss_sum before a forward through the model")
        weight, bias = self._weight, self._bias
        self._weight = self._bias = None
        return linear_cross_entropy_sum(hidden, weight, bias, labels, self.chunk)
