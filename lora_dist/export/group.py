"""The ranks taking part in an export: the default process group, or a stand-in for a single process.

Every collective the export needs (broadcast, all-gather, gathering bytes to
rank 0, and failing on every rank when one fails) goes through
:class:`RankGroup`, so the writer runs unchanged on one process.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from lora_dist.export.errors import ExportError

__all__ = ["RankGroup", "describe"]


def describe(e: BaseException) -> str:
    """One line naming an error's type and message, to tell the other ranks what failed."""
    return f"{type(e).__name__}: {e}"


class RankGroup:
    """The default process group, or a stand-in for a single process.

    Attributes:
        active: whether there is more than one rank.
        world: the number of ranks.
        rank: this rank.
        device: where byte tensors for :meth:`gather_bytes` live (the GPU under NCCL, else the CPU).
    """

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0
        nccl = self.active and "nccl" in str(dist.get_backend()).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def broadcast(self, obj):
        """Collective: rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Collective: every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor] | None:
        """Gather equal-length uint8 tensors (on :attr:`device`) to rank 0; None elsewhere."""
        gathered = [torch.empty_like(payload) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(payload, gathered, dst=0)
        return gathered

    def check(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (the failing rank re-raises its own error).

        Raises:
            ExportError: naming the first rank that failed, on the ranks that did not.
        """
        messages = self.all_gather(None if error is None else describe(error))
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise ExportError(f"rank {rank} failed: {message}")

    def on_rank0(self, fn: Callable[[], object]):
        """Collective: run ``fn`` on rank 0, hand its result (or its failure) to every rank.

        Raises:
            ExportError: ``fn`` failed on rank 0 (rank 0 re-raises its own error).
        """
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:
                error = e
        status = self.broadcast((None, result) if error is None else (describe(error), None))
        if error is not None:
            raise error
        if status[0] is not None:
            raise ExportError(f"rank 0 failed: {status[0]}")
        return status[1]
