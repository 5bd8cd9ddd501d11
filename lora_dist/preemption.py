"""Preemption: signals turned into a checkpoint and a requeue, agreed by every rank at a step boundary.

SIGUSR1 / SIGTERM (Slurm's preemption and time-limit signals): checkpoint, then exit with
:data:`PREEMPT_EXIT_CODE`, which the sbatch templates requeue on. SIGUSR2: checkpoint on
demand and keep training.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

__all__ = ["PREEMPT_EXIT_CODE", "Preempted", "PreemptionHandler"]

#: The exit code of a preempted run: its checkpoint is written, requeue it.
PREEMPT_EXIT_CODE = 99


class Preempted(SystemExit):
    """Raised after a preemption checkpoint: the job should exit and be requeued."""

    def __init__(self, step: int) -> None:
        super().__init__(PREEMPT_EXIT_CODE)
        self.step = step


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
        self._previous = {}
        for names, handler in ((self.STOP_SIGNALS, self._on_stop), (self.CHECKPOINT_SIGNALS, self._on_checkpoint)):
            for name in names:
                sig = getattr(signal, name, None)
                if sig is None:
                    continue
                try:
                    self._previous[sig] = signal.signal(sig, handler)
                except ValueError:  # not the main thread
                    pass

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
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
