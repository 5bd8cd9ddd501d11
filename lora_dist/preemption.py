"""Preemption: signals turned into a checkpoint and a requeue, agreed by every rank at a step boundary.

SIGUSR1 / SIGTERM (Slurm's preemption and time-limit signals): checkpoint, then exit with
:data:`PREEMPT_EXIT_CODE`, which the sbatch templates requeue on. SIGUSR2: checkpoint on
demand and keep training. Before training starts (:func:`stop_exits`: opening the base,
tokenizing, opening the run dir) there is nothing to save: a stop signal ends the rank at once
with :data:`PREEMPT_EXIT_CODE`, so the job is requeued all the same.
"""

from __future__ import annotations

import contextlib
import logging
import signal

import torch
import torch.distributed as dist

__all__ = ["PREEMPT_EXIT_CODE", "Preempted", "PreemptionHandler", "stop_exits"]

log = logging.getLogger(__name__)

#: The exit code of a preempted run: its checkpoint is written (or it had none to write), requeue it.
PREEMPT_EXIT_CODE = 99


class Preempted(SystemExit):
    """Raised after a preemption checkpoint, or before training with nothing to save (``before_training``, from
    :func:`stop_exits`): the job should exit and be requeued."""

    def __init__(self, step: int, before_training: bool = False) -> None:
        super().__init__(PREEMPT_EXIT_CODE)
        self.step = step
        #: A wait for another rank may still be in flight on a process group: exit without tearing them down.
        self.before_training = before_training


class PreemptionHandler:
    """Signals turned into requests that all ranks agree on at the next step boundary.

    SIGUSR1 / SIGTERM (preemption): checkpoint, then exit with :data:`PREEMPT_EXIT_CODE`.
    SIGUSR2 (on demand): checkpoint, then keep training.

    Installed on construction; a context manager that restores the previous handlers on exit.
    """

    STOP_SIGNALS = ("SIGUSR1", "SIGTERM")
    CHECKPOINT_SIGNALS = ("SIGUSR2",)

    def __init__(self) -> None:
        self._stop = False
        self._checkpoint = False
        self._previous = _install(self._on_stop, self._on_checkpoint)

    def _on_stop(self, signum, frame) -> None:
        self._stop = True

    def _on_checkpoint(self, signum, frame) -> None:
        self._checkpoint = True

    def poll(self, device: torch.device | None = None) -> tuple[bool, bool]:
        """``(stop, checkpoint)`` as agreed by all ranks (one tiny all-reduce on ``device``, the run's);
        clears the checkpoint request."""
        flags = torch.tensor([int(self._stop), int(self._checkpoint)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, checkpoint = bool(flags[0]), bool(flags[1])
        if checkpoint:
            self._checkpoint = False
        return stop, checkpoint

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._previous)
        self._previous = {}


def _install(on_stop, on_checkpoint) -> dict:
    """``on_stop`` for :attr:`PreemptionHandler.STOP_SIGNALS`, ``on_checkpoint`` for its checkpoint signals (where
    this platform has them, and only from the main thread); the handlers they replace, for :func:`_restore`."""
    previous = {}
    for names, handler in ((PreemptionHandler.STOP_SIGNALS, on_stop), (PreemptionHandler.CHECKPOINT_SIGNALS,
                                                                        on_checkpoint)):
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
    return previous


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def stop_exits(requeue: bool = True):
    """Within it a stop signal (SIGUSR1, SIGTERM) raises :class:`Preempted` (step 0) at once: for the work before
    training (the data tokenized, the model dir opened), which has nothing to checkpoint. A rank waiting for
    another's work polls (:meth:`lora_dist.ranks.RankGroup.on_rank0`), so it ends too. Each rank then exits with
    :data:`PREEMPT_EXIT_CODE` and the job is requeued, where before the signal's default action killed it (exit
    138 or 143), which no sbatch script requeues. SIGUSR2 (a checkpoint on demand) is ignored: there is nothing
    to save yet.

    ``requeue`` False (a run started from ``checkpoint.resume=DIR``, which a requeued job would replace by its own
    checkpoint, and it has none yet): nothing is installed, and a stop signal ends the rank as its default action
    does, unrequeued, rather than have the requeued job start afresh without DIR.
    """
    if not requeue:
        yield
        return

    def stop(signum, frame):
        log.warning("%s before training started: nothing to save yet; exiting with %d to be requeued",
                    signal.Signals(signum).name, PREEMPT_EXIT_CODE)
        raise Preempted(0, before_training=True)

    previous = _install(stop, signal.SIG_IGN)
    try:
        yield
    finally:
        _restore(previous)
