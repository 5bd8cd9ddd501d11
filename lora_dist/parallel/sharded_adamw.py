"""ZeRO-1 over the replicated LoRA: each rank keeps and steps 1/W of the AdamW state.

The LoRA params stay whole on every rank (the design needs them replicated), but their
optimizer does not have to be. Per bucket of LoRA gradients (filled as backward produces
them, as :class:`~lora_dist.parallel.reducer.LoRAGradReducer` does):

1. backward launches a **reduce-scatter** of the bucket: rank r receives the summed
   gradient of its 1/W slice only, and the bucket's full-size gradient is freed once
   its reduce-scatter is done (two run at once), so backward never holds every LoRA
   gradient whole;
2. :meth:`ShardedAdamW.step` clips by the global norm (one scalar all-reduce) and runs
   AdamW on this rank's slices: the moments exist for 1/W of the LoRA elements;
3. an **all-gather** of the updated slices writes every bucket back, whole, on every rank.

Reduce-scatter plus all-gather moves the same bytes as the all-reduce it replaces. The
LoRA params are views into the flat bucket buffers, so the all-gather updates them in
place. The math is AdamW's, element by element: W ranks compute what one process computes.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.collectives import all_gather_single, reduce_scatter_single
from lora_dist.parallel.reducer import BucketLauncher, fill_buckets

__all__ = ["ShardedAdamW"]

MOMENTS = ("exp_avg", "exp_avg_sq")
#: Reduce-scatters a backward keeps running at once; an older one's full-size gradient copy is freed.
IN_FLIGHT = 2


class _Bucket:
    """Params held as views of one flat fp32 buffer, padded to a multiple of W; rank r owns slice r."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], world: int, rank: int) -> None:
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        numel = sum(p.numel() for p in self.params)
        self.size = math.ceil(numel / world)  # this rank's slice
        device, dtype = self.params[0].device, self.params[0].dtype
        self.flat = torch.zeros(self.size * world, dtype=dtype, device=device)
        self.offsets = []
        offset = 0
        for p in self.params:
            self.flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            self.offsets.append(offset)
            offset += p.numel()
        self.lo = rank * self.size

    def own(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.lo:self.lo + self.size]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A full-size flat buffer -> ``{name: tensor shaped like the param}`` (views)."""
        return {n: flat[o:o + p.numel()].view_as(p) for n, o, p in zip(self.names, self.offsets, self.params)}


class ShardedAdamW(BucketLauncher):
    """AdamW over replicated LoRA params with the state sharded over the ranks of ``group``.

    Args:
        named_params: ``(name, param)`` of every LoRA param, identical on every rank, in model order.
        lr, betas, eps, weight_decay: AdamW's (``lr`` is set again by each :meth:`step`).
        bucket_mb: gradient bucket size in MB (buckets are reduce-scattered as backward fills them).
        group: process group (default: world).
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, bucket_mb: float = 25.0, group=None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        groups = fill_buckets(named_params, lambda item: item[1].numel() * item[1].element_size(), bucket_mb)
        self.buckets = [_Bucket(g, self.world, rank) for g in groups]
        device = named_params[0][1].device
        #: This rank's slices of every bucket, one flat param: what AdamW steps.
        self.shard = nn.Parameter(torch.cat([b.own(b.flat).detach() for b in self.buckets]).clone())
        self.optimizer = torch.optim.AdamW([self.shard], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._grad = torch.zeros_like(self.shard)
        self._watch([b.params for b in self.buckets])
        self.device = device

    # ------------------------------------------------------------------ gradients

    def _slice(self, b: int) -> slice:
        start = sum(bucket.size for bucket in self.buckets[:b])
        return slice(start, start + self.buckets[b].size)

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        flat = torch.zeros_like(bucket.flat)
        for p, offset in zip(bucket.params, bucket.offsets):
            if p.grad is not None:
                flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = None  # the flat copy holds it now
        out = self._grad[self._slice(b)]
        work = reduce_scatter_single(out, flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._works.append((work, flat))  # keep the input alive until the collective is done
        while len(self._works) > IN_FLIGHT:  # then free it: a full-size copy lives for a few buckets, not all
            done, _ = self._works.pop(0)
            done.wait()  # type: ignore[attr-defined]

    def _finish_grads(self) -> None:
        self._launch_the_rest()  # params backward did not reach (unused) send zeros
        for work, _ in self._works:
            work.wait()  # type: ignore[attr-defined]
        self._reset()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, lr: float, max_grad_norm: float) -> float:
        """Finish the reduce-scatter, clip by the global norm, update this rank's slices, all-gather them.

        Returns:
            The global gradient norm before clipping (the same on every rank).
        """
        self._finish_grads()
        squares = self._grad.double().square().sum().reshape(1)
        dist.all_reduce(squares, group=self.group)
        norm = squares.sqrt()
        if max_grad_norm > 0:  # clip_grad_norm_'s coefficient, on the device: the update is queued without waiting
            # for the norm; rounded to the gradient's dtype first, as a Python float was (times 1: unchanged)
            self._grad.mul_((max_grad_norm / (norm + 1e-6)).clamp(max=1.0).to(self._grad.dtype))
        self.shard.grad = self._grad
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.shard.grad = None
        self._grad.zero_()
        self._all_gather(self.shard.detach(), [b.flat for b in self.buckets])
        return float(norm)

    def _all_gather(self, local: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        for b, out in enumerate(self.buckets):
            all_gather_single(outputs[b], local[self._slice(b)].contiguous(), group=self.group)

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
        self._grad.zero_()
        self._reset()

    # ------------------------------------------------------------------ the state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 AdamW moments by LoRA name, ``<name>.exp_avg`` / ``.exp_avg_sq`` (collective); empty before
        the first step."""
        state = self.optimizer.state.get(self.shard)
        if not state:
            return {}
        out: dict[str, torch.Tensor] = {}
        for key in MOMENTS:
            full = [torch.empty_like(b.flat) for b in self.buckets]
            self._all_gather(state[key], full)
            for b, flat in zip(self.buckets, full):
                out.update({f"{n}.{key}": t.float().cpu().clone() for n, t in b.split(flat).items()})
        return out

    @torch.no_grad()
    def load_state_dict(self, moments: Mapping[str, torch.Tensor], step: int) -> None:
        """Take full moments by LoRA name (:meth:`state_dict`'s form, from any world size); ``step`` steps done.
        Load the LoRA params into the model first (they are views of the buckets)."""
        self.resync_params()
        names = [n for b in self.buckets for n in b.names]
        if not names or f"{names[0]}.exp_avg" not in moments:
            self.optimizer.state.clear()
            return
        state = {"step": torch.tensor(float(step))}
        for key in MOMENTS:
            parts = []
            for b in self.buckets:
                flat = torch.zeros_like(b.flat)
                for n, view in b.split(flat).items():
                    view.copy_(moments[f"{n}.{key}"].to(view.device, view.dtype))
                parts.append(b.own(flat))
            state[key] = torch.cat(parts).clone()
        self.optimizer.state[self.shard] = state

    def resync_params(self) -> None:
        """After the LoRA params were written (a resume, a load): this rank's master slices follow them."""
        with torch.no_grad():
            self.shard.copy_(torch.cat([b.own(b.flat) for b in self.buckets]))

    def clear(self) -> None:
        """Free the optimizer state and gradients (training is over)."""
        self.optimizer.state.clear()
        self._grad = torch.zeros(0, device=self.device)
