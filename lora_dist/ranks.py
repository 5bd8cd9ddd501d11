"""The ranks of a job: the default process group, or a stand-in for a single process.

The small collectives of file work (broadcast, all-gather, gathering bytes to rank 0,
running a step on rank 0 only, and failing on every rank when one fails) go through
:class:`RankGroup`, so the export, the run dir and the checkpoints run unchanged on one
process. A failure on one rank is raised on the others with the same type where it is a
user error (one line, exit 2, on every rank), else as :class:`RankFailed`; a rank stopped before training
(:class:`lora_dist.preemption.Preempted`) stops the others with it, each to be requeued.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch
import torch.distributed as dist

from lora_dist.errors import USER_ERRORS
from lora_dist.preemption import Preempted, stop_key, stopping

__all__ = ["GATHER_BUDGET", "RankFailed", "RankGroup"]

#: :meth:`RankGroup.gather_bytes`: the most bytes rank 0 receives in one round, from all ranks together.
GATHER_BUDGET = 1 << 30
#: Seconds between polls of a patient wait for rank 0 (:meth:`RankGroup.on_rank0`).
POLL_S = 0.05


class RankFailed(RuntimeError):
    """Another rank failed with an error that is not a user error; this rank stops with it."""


def _failure(error: BaseException) -> tuple[str, str, str]:
    return type(error).__module__, type(error).__qualname__, str(error)


def _raise_for(rank: int, failure: tuple[str, str, str]) -> None:
    """Raise on this rank what failed on ``rank``: the same type where it is a user error (a subclass of
    one of :data:`lora_dist.errors.USER_ERRORS`), else :class:`RankFailed`."""
    import importlib

    module, name, message = failure
    text = f"rank {rank} failed: {message}"
    try:
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError):
        cls = None
    if cls is Preempted:
        raise _stopped_with(rank)
    if isinstance(cls, type) and issubclass(cls, USER_ERRORS):
        try:
            error = cls(text)
        except Exception:  # a constructor that wants more than a message
            error = None
        if error is not None:
            raise error
    raise RankFailed(f"rank {rank} failed: {name}: {message}")


def _stopped_with(rank: int) -> Preempted:
    """This rank's stop when ``rank`` was stopped before training (a signal only that rank got): it ends too, to be
    requeued, instead of waiting for a rank that is gone."""
    return stopping(f"rank {rank} was stopped before training")


def _stops_seen(collective):
    """A collective that fails because a rank left after a stop before training (:func:`lora_dist.preemption.
    stopping` left word in the store) stops this rank too, rather than failing it (exit 1, which no sbatch script
    requeues)."""

    @functools.wraps(collective)
    def run(*args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except RuntimeError as error:  # gloo: "Connection closed by peer"
            from lora_dist.launch import stopped_rank

            rank = stopped_rank(stop_key())
            if rank is None:
                raise
            raise _stopped_with(rank) from error

    return run


class RankGroup:
    """The default process group, or a stand-in for a single process.

    ``RankGroup(patient=True)`` waits in each collective up to a day instead of the default group's timeout
    (``parallel.timeout_s``), on the gloo group :func:`lora_dist.launch.patient_group` made at start-up, for work
    that one rank does while the others wait (building the token cache, a merged export's final fsync); where
    there is none (a default group lora_dist did not make), the default group. A rank that dies ends such a
    wait when its launcher stops the job (torchrun, ``srun --wait``, mpirun) or a rank next talks to it.

    Attributes:
        active: whether there is more than one rank.
        world: the number of ranks.
        rank: this rank.
        device: where byte tensors for :meth:`gather_bytes` live (the GPU under NCCL, else the CPU).
    """

    def __init__(self, patient: bool = False) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0
        nccl = self.active and "nccl" in str(dist.get_backend()).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.group = None
        if self.active and patient:
            from lora_dist.launch import patient_group

            self.group = patient_group()
            if self.group is not None:
                self.device = torch.device("cpu")

    @_stops_seen
    def broadcast(self, obj):
        """Collective: rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    @_stops_seen
    def _arrive(self, stopped: bool = False) -> int | None:
        """Collective, on the patient group: wait until every rank is here, polling, so that a signal's Python
        handler runs meanwhile (a stop signal ends a rank waiting for the token cache; a blocking collective would
        hold it until the others arrive, or a day). ``stopped``: this rank was stopped before training, and says so.

        Returns:
            The highest rank that was stopped, or None.
        """
        flag = torch.tensor([self.rank + 1 if stopped else 0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        try:
            while not work.is_completed():
                time.sleep(POLL_S)
            work.wait()
        except RuntimeError:  # a rank that left: this rank's own stop is what it raises
            if not stopped:
                raise
            return self.rank
        return int(flag[0]) - 1 if int(flag[0]) else None

    @_stops_seen
    def all_gather(self, obj) -> list:
        """Collective: every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor] | None:
        """Gather equal-length uint8 tensors (on :attr:`device`) to rank 0, into its host memory; None elsewhere.

        In rounds of at most :data:`GATHER_BUDGET` bytes over all ranks: rank 0's device never holds more
        than that (a whole embedding or stacked-expert tensor would not fit beside the model's shards).
        """
        n = payload.numel()
        step = max(1, min(n, GATHER_BUDGET // self.world))
        if step == n and payload.device.type == "cpu":  # one round into host memory: the buffers are the result
            gathered = [torch.empty_like(payload) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(payload, gathered, dst=0, group=self.group)
            return gathered
        out = [torch.empty(n, dtype=payload.dtype) for _ in range(self.world)] if self.rank == 0 else None
        for start in range(0, n, step):
            piece = payload[start:start + step].contiguous()
            gathered = [torch.empty_like(piece) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(piece, gathered, dst=0, group=self.group)
            if out is not None:
                for whole, part in zip(out, gathered):
                    whole[start:start + part.numel()].copy_(part)
        return out

    def check(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (the failing rank re-raises its own error).

        On the patient group the ranks wait for each other polling: a rank stopped meanwhile, or stopped in its own
        work (``error`` a :class:`~lora_dist.preemption.Preempted`), stops every rank.

        Raises:
            The first failing rank's error type (a user error) or :class:`RankFailed`, naming that rank,
            on the ranks that did not fail; :class:`~lora_dist.preemption.Preempted` where a rank was stopped.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        if self.group is not None:
            stopped = self._arrive(isinstance(error, Preempted))
            if stopped is not None:
                raise error if isinstance(error, Preempted) else _stopped_with(stopped)
        failures = self.all_gather(None if error is None else _failure(error))
        if error is not None:
            raise error
        for rank, failure in enumerate(failures):
            if failure is not None:
                _raise_for(rank, failure)

    def on_rank0(self, fn: Callable[[], object]):
        """Collective: run ``fn`` on rank 0 only, hand its result (or its failure) to every rank.

        The other ranks wait until rank 0 is done, so this is also the barrier that keeps them
        from running ahead of rank 0's writes. Where rank 0 is stopped in ``fn`` before training (a
        :class:`~lora_dist.preemption.Preempted`), every rank is.

        Raises:
            ``fn``'s error on rank 0; on the other ranks the same user-error type, :class:`RankFailed`, or
            :class:`~lora_dist.preemption.Preempted`.
        """
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except (Exception, Preempted) as e:
                error = e
        if not self.active:
            if error is not None:
                raise error
            return result
        if self.group is not None and self._arrive(isinstance(error, Preempted)) is not None:
            raise error if isinstance(error, Preempted) else _stopped_with(0)
        status = self.broadcast((None, result) if error is None else (_failure(error), None))
        if error is not None:
            raise error
        if status[0] is not None:
            _raise_for(0, status[0])
        return status[1]
