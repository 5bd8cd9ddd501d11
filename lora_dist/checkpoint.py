"""Resumable training state: LoRA weights, optimizer, step, data position.

The frozen base is never written. A checkpoint is a directory::

    checkpoints/step-000040/
        lora.safetensors        LoRA tensors by the model's own names
        optimizer.safetensors   AdamW exp_avg / exp_avg_sq per LoRA tensor, full (not sharded)
        state.json              step, samples consumed, base identity, LoRA settings, world size, strategy

Everything is stored whole and by parameter name, so a run resumes on another
world size or strategy. Writes are atomic and durable: a temporary sibling dir
is fsynced and renamed, and the ``latest`` pointer is replaced last, each rename
fsynced. Non-finite state is never written. A checkpoint that fails to read
falls back to the previous good one; one made with other LoRA settings or
shapes is refused.

Dropout randomness is re-derived from ``(train.seed, step, rank)`` every step,
so no RNG state needs saving and a resumed run draws the same masks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from lora_dist.atomic import write_text_atomic, writing_dir
from lora_dist.config import Config
from lora_dist.launch import LaunchEnv
from lora_dist.model_dir import SAFE_INDEX

__all__ = [
    "CheckpointManager",
    "Preempted",
    "PreemptionHandler",
    "ResumeError",
    "TrainingDiverged",
    "base_identity",
]

log = logging.getLogger(__name__)

LATEST = "latest"
PREEMPT_EXIT_CODE = 99
#: The ``lora.*`` settings a checkpoint records; resuming with any of them changed is refused.
LORA_SETTINGS = ("r", "alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
                 "rank_pattern", "alpha_pattern")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked."""


class TrainingDiverged(RuntimeError):
    """The loss, gradients or LoRA state became NaN/Inf."""


class Preempted(SystemExit):
    """Raised after a preemption checkpoint: the job should exit and be requeued."""

    def __init__(self, step: int) -> None:
        super().__init__(PREEMPT_EXIT_CODE)
        self.step = step


def base_identity(model_path: str, samples: int = 8, sample_bytes: int = 1 << 16) -> dict:
    """What identifies the base model: its path, and a hash of config.json, the weight index, and
    of every safetensors file's size, header and a few evenly spaced samples of its bytes.

    Sampling keeps this cheap for 400B-parameter checkpoints while two checkpoints with the
    same shapes but different weights still hash differently.
    """
    root = Path(model_path)
    h = hashlib.sha256()
    for name in ("config.json", SAFE_INDEX):
        f = root / name
        if f.is_file():
            h.update(f.read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header, 100_000_000)))
            for i in range(samples):
                fh.seek(size * i // samples)
                h.update(fh.read(sample_bytes))
    return {"path": str(root.resolve()), "sha256": h.hexdigest()}


def _lora_settings(cfg: Config) -> dict:
    """The recorded ``lora.*`` settings, as they read back from JSON."""
    return json.loads(json.dumps({k: getattr(cfg.lora, k) for k in LORA_SETTINGS}))


def _check_finite(tensors: dict[str, torch.Tensor], step: int) -> None:
    bad = next((k for k, v in tensors.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise TrainingDiverged(f"{bad} is not finite at step {step}; checkpoint not written, the last good one is kept. "
                               "Lower train.lr or check the data")


class CheckpointManager:
    """Saves and restores training state under ``<output.dir>/checkpoints``.

    Args:
        root: the checkpoints dir.
        cfg: the run config (``checkpoint.*``, ``train.*``, ``model.path``).
        env: this process's launch environment.
    """

    def __init__(self, root: Path, cfg: Config, env: LaunchEnv) -> None:
        self.root, self.cfg, self.env = Path(root), cfg, env
        self.samples_offset = 0
        self.resumed_step = 0

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0 and step < self.cfg.train.steps

    def _samples(self, step: int) -> int:
        t = self.cfg.train
        done = step - self.resumed_step
        return self.samples_offset + done * t.grad_accum * t.micro_batch_size * self.env.world_size

    def save(self, step: int, engine) -> Path | None:
        """Write a checkpoint for ``step`` (collective; rank 0 writes).

        Raises:
            TrainingDiverged: a LoRA tensor or AdamW moment is NaN/Inf (on every rank; nothing is written).
        """
        state = engine.state_dict()
        lora, moments = state["lora"], state["optimizer"]
        _check_finite({**lora, **moments}, step)
        final = self.root / f"step-{step:06d}"
        if self.env.is_main:
            record = {
                "step": step,
                "samples_consumed": self._samples(step),
                "base": base_identity(self.cfg.model.path),
                "world_size": self.env.world_size,
                "strategy": self.cfg.parallel.strategy,
                "lora": _lora_settings(self.cfg),
            }
            with writing_dir(final, replace=True) as staging:
                save_file({k: v.cpu().contiguous() for k, v in lora.items()}, str(staging / "lora.safetensors"))
                save_file({k: v.contiguous() for k, v in moments.items()}, str(staging / "optimizer.safetensors"))
                (staging / "state.json").write_text(json.dumps(record, indent=2) + "\n")
            write_text_atomic(self.root / LATEST, final.name + "\n")
            self._prune()
            log.info("checkpoint saved: %s", final)
        if dist.is_initialized():
            dist.barrier()
        return final

    def _prune(self) -> None:
        """Drop all but the newest ``checkpoint.keep`` checkpoints, and temp dirs of writers that were killed."""
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        stale = [p for p in self.root.glob(".step-*.tmp-*") if p.is_dir()]  # writers that were killed
        for old in done[: -self.cfg.checkpoint.keep] + stale:
            shutil.rmtree(old, ignore_errors=True)

    def _candidates(self) -> list[Path]:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return []
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise ResumeError(f"checkpoint.resume={resume!r} is not a checkpoint dir")
            return [path]
        if not self.root.is_dir():
            return []
        found = sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True)
        latest = self.root / LATEST
        if latest.is_file():
            named = self.root / latest.read_text().strip()
            found = [named] + [p for p in found if p != named]
        return found

    def _read(self, path: Path) -> tuple[dict, dict, dict]:
        try:
            state = json.loads((path / "state.json").read_text())
            lora = load_file(str(path / "lora.safetensors"))
            moments = load_file(str(path / "optimizer.safetensors"))
        except Exception as e:  # missing file, truncated JSON, corrupt safetensors
            raise ResumeError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(state.get("step"), int):
            raise ResumeError(f"{path}/state.json has no step")
        return state, lora, moments

    def maybe_resume(self, engine) -> int:
        """Restore the newest readable checkpoint; returns the step to start from (0 if none)."""
        for path in self._candidates():
            try:
                state, lora, moments = self._read(path)
            except ResumeError as e:
                if self.cfg.checkpoint.resume != "auto":
                    raise
                if self.env.is_main:
                    log.warning("skipping corrupt checkpoint: %s; falling back to the previous one", e)
                continue
            ident = base_identity(self.cfg.model.path)
            if state.get("base", {}).get("sha256") != ident["sha256"] and not self.cfg.checkpoint.force:
                raise ResumeError(
                    f"{path} was trained on base {state.get('base', {}).get('path')!r}, not {ident['path']!r} "
                    "(config/weights differ); use the same model.path or set checkpoint.force=true"
                )
            self._check_lora(path, state, lora, engine)
            engine.load_state_dict({"lora": lora, "optimizer": moments}, state["step"])
            self.resumed_step = state["step"]
            self.samples_offset = state.get("samples_consumed", 0)
            if self.env.is_main:
                log.info("resumed from %s at step %d", path, state["step"])
            return state["step"]
        return 0

    def _check_lora(self, path: Path, state: dict, lora: dict[str, torch.Tensor], engine) -> None:
        """Refuse a checkpoint whose LoRA settings, names or shapes differ from this run's (before any copy)."""
        fresh = "or start a fresh output.dir (or checkpoint.resume=never)"
        current = _lora_settings(self.cfg)
        for key, saved in state.get("lora", {}).items():
            if key in current and current[key] != saved:
                was, now = f"lora.{key}={json.dumps(saved)}", f"lora.{key}={json.dumps(current[key])}"
                raise ResumeError(f"{path} was trained with {was}, this run has {now}; resume with {was} {fresh}")
        shapes = {k: list(v.shape) for k, v in engine.lora_state_dict().items()}
        if set(lora) != set(shapes):
            raise ResumeError(f"{path}: its LoRA tensors do not match this model's LoRA layers (lora.* changed?); "
                              f"resume with the original lora.* settings {fresh}")
        for name, shape in shapes.items():
            if list(lora[name].shape) != shape:
                raise ResumeError(f"{path}: {name} is {list(lora[name].shape)} in the checkpoint but {shape} in this "
                                  f"model (another base?); resume on the base it was trained on {fresh}")


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
