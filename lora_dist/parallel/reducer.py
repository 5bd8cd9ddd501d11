"""Gradient buckets launched in order from backward's hooks (:class:`BucketLauncher`), and on them the bucketed
all-reduce of the replicated LoRA gradients, overlapped with backward (:class:`LoRAGradReducer`, fsdp2)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.errors import UserError

__all__ = ["BucketLauncher", "GradientSyncError", "LoRAGradReducer", "fill_buckets"]

T = TypeVar("T")


class GradientSyncError(UserError, RuntimeError):
    """A second backward with gradient sync before the optimizer step: its gradients would never be sent."""


def fill_buckets(items: list[T], nbytes: Callable[[T], int], bucket_mb: float) -> list[list[T]]:
    """``items`` in buckets of at most ``bucket_mb`` MB (one item may exceed it alone), filled in reverse
    order: roughly the order backward produces the gradients."""
    buckets: list[list[T]] = []
    limit, size = bucket_mb * 1e6, 0.0
    for item in reversed(items):
        n = nbytes(item)
        if not buckets or size + n > limit:
            buckets.append([])
            size = 0.0
        buckets[-1].append(item)
        size += n
    return buckets


class BucketLauncher:
    """Launches each bucket's collective from backward's gradient hooks, once all its gradients are in,
    strictly in bucket order, so every rank issues the same collectives in the same sequence. While
    :meth:`no_sync` is active nothing is communicated: gradients accumulate locally and are sent once, at the
    accumulation boundary. Subclasses say what a bucket's launch sends (:meth:`_launch`)."""

    def _watch(self, buckets: list[list[nn.Parameter]]) -> None:
        self._sizes = [len(b) for b in buckets]
        self._bucket_of = {id(p): i for i, b in enumerate(buckets) for p in b}
        self._sync = True
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for b in buckets for p in b]

    def _reset(self) -> None:
        self._ready: list[set[int]] = [set() for _ in self._sizes]
        self._works: list = []
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-steps inside gradient accumulation: gradients accumulate locally, nothing is sent."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._sync:
            return
        b = self._bucket_of[id(param)]
        if b < self._next or id(param) in self._ready[b]:  # this step's gradients of it were sent, or are about to be
            raise GradientSyncError(
                "backward ran again with gradient sync before engine.step(): the first backward's gradients are "
                "sent already and this one's would be lost; run every micro-batch but the last inside "
                "engine.no_sync() (docs/integrations.md)")
        self._ready[b].add(id(param))
        while self._next < len(self._sizes) and len(self._ready[self._next]) == self._sizes[self._next]:
            self._launch(self._next)
            self._next += 1

    def _launch_the_rest(self) -> None:
        """The buckets backward did not complete (params it did not reach, unused): launched now."""
        while self._next < len(self._sizes):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class LoRAGradReducer(BucketLauncher):
    """Bucketed all-reduce (sum) of replicated LoRA gradients, overlapped with backward.

    Buckets are filled in reverse registration order (roughly the order backward produces gradients) and
    launched as :class:`BucketLauncher` does.

    Args:
        params: the LoRA params (identical on every rank).
        bucket_mb: bucket size in MB.
        group: process group (default: world).
    """

    def __init__(self, params: list[nn.Parameter], bucket_mb: float = 25.0, group=None) -> None:
        self.group = group
        self.buckets = fill_buckets(params, lambda p: p.numel() * p.element_size(), bucket_mb)
        self._watch(self.buckets)

    def _launch(self, b: int) -> None:
        params = self.buckets[b]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        for p in params:
            p.grad = None  # the flat copy holds these gradients now; finish() hands them back as views of it
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._works.append((work, flat, params))

    def finish(self) -> None:
        """Launch what backward did not (unused params), wait, and set each gradient to its reduced
        slice of the bucket (a view: the gradients are never held twice)."""
        self._launch_the_rest()
        for work, flat, params in self._works:
            work.wait()  # type: ignore[attr-defined]
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        self._reset()
