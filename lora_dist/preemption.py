"""Preemption: signals turned into a checkpoint and a requeue, agreed by every rank at a step boundary.

SIGUSR1 / SIGTERM (Slurm's preemption and time-limit signals): checkpoint, then exit with
:data:`PREEMPT_EXIT_CODE`, which the sbatch templates requeue on. SIGUSR2: checkpoint on
demand and keep training. Before training starts (:func:`stop_exits`: opening the base,
tokenizing, opening the run dir) there is nothing to save: a stop signal ends the rank at once
with :data:`PREEMPT_EXIT_CODE`, so the job is requeued all the same.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the CLI holds stop signals (hold_stop_signals) before torch loads
    import torch

__all__ = ["PREEMPT_EXIT_CODE", "Preempted", "PreemptionHandler", "hold_stop_signals", "ignore_stop_signals",
           "release_stop_signals", "stop_exits", "stop_key", "stopping"]

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

    Before :meth:`training` (:func:`stop_exits`, with ``stop_raises`` or ``deferred``) SIGUSR2 is ignored, and a
    stop signal raises :class:`Preempted` at once (``stop_raises``), or is left to its default action, which ends
    the process (``deferred``). Installed on construction; a context manager that
    restores the previous handlers on exit.
    """

    STOP_SIGNALS = ("SIGUSR1", "SIGTERM")
    CHECKPOINT_SIGNALS = ("SIGUSR2",)

    def __init__(self, stop_raises: bool = False, deferred: bool = False) -> None:
        self._stop = False
        self._checkpoint = False
        self._stop_raises = stop_raises
        self._training = not (stop_raises or deferred)
        self._previous = _install(None if deferred else self._on_stop, self._on_checkpoint)

    def _on_stop(self, signum, frame) -> None:
        self._stop = True
        if self._stop_raises and not _stopping:  # a second signal leaves the first one's unwinding alone
            raise stopping(f"{signal.Signals(signum).name} before training started")

    def _on_checkpoint(self, signum, frame) -> None:
        if self._training:
            self._checkpoint = True

    def training(self) -> None:
        """Training starts: from now on a stop signal is a request :meth:`poll` reports at a step boundary. The
        handlers are the same ones throughout (a signal between the two phases is not lost to its default
        action)."""
        self._stop_raises = False
        self._training = True
        # again, the stop signals included where they were deferred: what took them meanwhile (MPI's init) gives
        # them back; the handlers to restore stay the ones found first
        for sig, handler in _install(self._on_stop, self._on_checkpoint).items():
            self._previous.setdefault(sig, handler)

    def poll(self, device: torch.device | None = None) -> tuple[bool, bool]:
        """``(stop, checkpoint)`` as agreed by all ranks (one tiny all-reduce on ``device``, the run's);
        clears the checkpoint request."""
        import torch
        import torch.distributed as dist

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


_stopping = False
_generation = 0  # of stop_exits calls: every rank makes them in step (a train() call each)


def stop_key() -> str:
    """The rendezvous store key where a rank stopped before training, in this run, leaves its rank (a key of an
    earlier run in the same process group says nothing of this one)."""
    return f"lora_dist/stopped/{_generation}"


def stopping(why: str) -> Preempted:
    """The :class:`Preempted` that ends this rank before training (``why``: a signal, or another rank's stop).

    The first one is logged and marks the rank as stopping: a later stop signal leaves its unwinding (its cleanup)
    alone. It also leaves word for the other ranks (:func:`lora_dist.launch.say_stopped`): a collective of theirs
    that fails because this rank left stops them too (:class:`lora_dist.ranks.RankGroup`)."""
    global _stopping
    if not _stopping:
        _stopping = True
        log.warning("%s: nothing to save yet; exiting with %d to be requeued", why, PREEMPT_EXIT_CODE)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from lora_dist.launch import say_stopped

            say_stopped(dist.get_rank(), stop_key())
    return Preempted(0, before_training=True)


def _install(on_stop, on_checkpoint) -> dict:
    """``on_stop`` for :attr:`PreemptionHandler.STOP_SIGNALS`, ``on_checkpoint`` for its checkpoint signals (where
    this platform has them, and only from the main thread; None: left as they are); the handlers they replace,
    for :func:`_restore`."""
    previous = {}
    for names, handler in ((PreemptionHandler.STOP_SIGNALS, on_stop), (PreemptionHandler.CHECKPOINT_SIGNALS,
                                                                        on_checkpoint)):
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None or handler is None:
                continue
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
    return previous


def ignore_stop_signals() -> None:
    """Ignore the stop signals from now on (a process whose exit code is decided), where this thread may."""
    _install(signal.SIG_IGN, None)


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def stop_exits(requeue: bool = True) -> PreemptionHandler:
    """The signal handlers of a run from its start: until :meth:`PreemptionHandler.training`, while the base is
    opened, the data tokenized and the run dir opened, a stop signal (SIGUSR1, SIGTERM) raises :class:`Preempted`
    (step 0) at once, as there is nothing to checkpoint yet. A rank waiting for another's work polls
    (:class:`lora_dist.ranks.RankGroup`), so it ends too, and a rank stopped inside such work tells the others. Each
    rank then exits with :data:`PREEMPT_EXIT_CODE` and the job is requeued, where before the signal's default
    action killed it (exit 138 or 143), which no sbatch script requeues. SIGUSR2 (a checkpoint on demand) is
    ignored: there is nothing to save yet.

    ``requeue`` False (a run started from ``checkpoint.resume=DIR``, which a requeued job would replace by its own
    checkpoint, and it has none yet): the stop signals keep their default action until training starts, and end
    the rank unrequeued, rather than have the requeued job start afresh without DIR.
    """
    global _stopping, _generation
    _stopping = False
    _generation += 1
    handler = PreemptionHandler(stop_raises=requeue, deferred=not requeue)
    held, before = _held.pop("signals", []), _held.pop("previous", {})
    if requeue:
        handler._previous.update(before)  # on exit, the handlers the hold found, not the hold's
    else:  # deferred: the stop signals keep the handlers the hold found until training starts
        _restore(before)
    for signum in held:  # as if they came now
        signal.raise_signal(signum)
    return handler


#: A hold's (:func:`hold_stop_signals`) stop signals received, and the handlers it replaced.
_held: dict = {}


def hold_stop_signals() -> None:
    """From a process's first moment (the CLI's start, before torch and transformers load: about 3 s) until
    :func:`stop_exits` installs a run's handlers, a stop signal is held, then handed to them: its default action
    ended the process (exit 138 or 143, no requeue). :func:`release_stop_signals` ends a hold no run took over."""
    _held["signals"] = []
    _held["previous"] = _install(_hold, None)


def _hold(signum, frame) -> None:
    _held.setdefault("signals", []).append(signum)


def release_stop_signals() -> None:
    """End a hold :func:`stop_exits` did not take over (the command ended before training): the handlers it found
    are back, and a signal held meanwhile takes its course under them."""
    held, before = _held.pop("signals", []), _held.pop("previous", {})
    _restore(before)
    for signum in held:
        signal.raise_signal(signum)
