"""Resumable training state: LoRA weights, optimizer, step, data position; and what training may write.

The frozen base is never written. A checkpoint is a directory::

    checkpoints/step-000040/
        lora.safetensors        LoRA tensors by the model's own names
        optimizer.safetensors   AdamW exp_avg / exp_avg_sq per LoRA tensor, full (not sharded)
        state.json              step, samples consumed, run id, base identity, LoRA settings, model.quantize,
                                the schedule and AdamW settings, world size, strategy, the data blocks'
                                fingerprint and the seed

Everything is stored whole and by parameter name, so a run resumes on another
world size or strategy. Writes are atomic and durable (:mod:`lora_dist.atomic`):
a staging sibling dir is fsynced and renamed into place, then the ``latest``
pointer is replaced, each rename fsynced. Non-finite state is never written.

Dropout randomness is re-derived from ``(train.seed, step, rank)`` every step,
so no RNG state needs saving and a resumed run draws the same masks.

Checkpoints belong to a run
---------------------------
Every checkpoint's ``state.json`` records the ``run_id`` of its run dir's marker
(:func:`lora_dist.outputs.prepare_run_dir`). Checkpoints written before run ids
existed (no ``run_id``) are taken as the run dir's own.

* **Pruning** (after each save, rank 0) looks only at this run's checkpoints and
  orders them by the step in their ``state.json``, never by name: the newest
  ``checkpoint.keep`` up to the step just saved are kept (``keep <= 0`` keeps all);
  this run's checkpoints *after* that step are from before a rollback (a resume
  from an earlier step) and are removed. The checkpoint just saved, which
  ``latest`` names, is never removed. Another run's dirs, dirs without a
  readable ``state.json`` and anything not named ``step-N`` are never touched.
* **``latest``** is replaced only after its checkpoint is complete and durable,
  and always names an existing, complete checkpoint of this run: when a resume
  falls back past a broken one, ``latest`` is pointed at the checkpoint resumed.
* **A fresh run over an earlier run's checkpoints is refused** (we chose refusing
  over moving them aside: nothing is renamed behind the user's back).
  ``checkpoint.resume=never`` with any ``step-*`` dir in ``checkpoints/`` is a
  one-line error naming the fixes (``checkpoint.resume=auto``, move
  ``checkpoints/`` away, or a new ``output.dir``), but on a restart of the launch
  that saved them all (``job`` in their ``state.json``, as the restarting launcher
  names the launch: :func:`lora_dist.launch.detect.launch_identity`), which goes
  on from them.
* **``checkpoint.resume=auto`` never resumes another run's checkpoint**: a
  ``checkpoints/`` dir holding a ``step-*`` dir of another run, or one whose
  ``state.json`` is unreadable (whose run cannot be told), is refused before any
  work, whether or not ``latest`` is valid. Within this run, a checkpoint that fails
  to read (or whose ``state.json`` is nonsense: a negative step, a step that is not
  the dir's) is skipped with a warning for the previous one; when none of this
  run's checkpoints is readable the run is refused, never restarted from step 0
  over them. An explicitly named ``checkpoint.resume=DIR`` is read as named (of
  any run); a broken one is an error. A restarted job (``torchrun --max-restarts``,
  a Slurm requeue) whose run has saved checkpoints going on from DIR (``resumed_from``
  in their ``state.json``) resumes ``latest`` instead: its workers get the same
  arguments again.

What training may create, replace or delete
-------------------------------------------
``lora-dist train`` writes under ``output.dir`` only, and only once every input
(model dir, tokenizer, data, config) is validated and ``output.dir`` is accepted
as a run dir (:func:`lora_dist.outputs.prepare_run_dir`: absent, empty, or a run
dir lora_dist wrote; never an input, inside one or containing one). Rank 0 does
every write; the other ranks wait for it. There it:

* creates ``output.dir`` (when absent), the marker ``.lora_dist_run.json`` (when
  absent) and the lock ``.lora_dist_run.lock`` (held while the run lives), and a
  ``.write-test-*`` probe it removes at once;
* replaces ``config.json`` (once the resume succeeded or a fresh start is decided);
* appends to ``metrics.jsonl`` each ``train.log_every`` steps, and after a resume
  from step S (S = 0 for a fresh start) replaces it without the rows after S
  and without torn lines;
* replaces ``adapter/`` at the end (``export.adapter=true``; first putting back
  a version a killed writer set aside, ``.adapter.old-*``, and removing
  ``.adapter.tmp-*``);
* creates ``merged/`` at the end (``export.merged=true``); an existing one is
  refused before any work unless ``output.overwrite=true``, and then replaced
  (what may be replaced there is :mod:`lora_dist.export`'s rule);
* in ``checkpoints/``: creates ``step-N/`` (``checkpoint.every`` and the last step, a
  preemption signal, ``train.run_steps``), replaces a ``step-N/`` of this run (never another
  run's or an unknown one: refused) and ``latest``, deletes this run's ``step-N/``
  by the pruning rule above (renamed to ``.step-N.del-*`` first, then removed: a
  deletion cut short leaves no ``step-N/`` without its state), and removes its own
  staging (``.step-N.tmp-*``), set-aside (``.step-N.old-*``) and deleted
  (``.step-N.del-*``) dirs left by a killed writer (a set-aside version whose
  final dir is missing is put back instead).

Nothing else is created, replaced or deleted: not the inputs, not a file of the
user's. A write that fails (a full disk, a read-only filesystem) is a one-line
:class:`~lora_dist.outputs.OutputDirError` (exit 2) naming what is intact; a
checkpoint that fails to write leaves the previous checkpoint and ``latest`` as
they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_dist.atomic import discard, recover, write_text_atomic, writing_dir
from lora_dist.config import Config
from lora_dist.dtypes import all_finite
from lora_dist.errors import UserError
from lora_dist.launch import LaunchEnv
from lora_dist.launch.detect import job_restart, launch_identity, restarting_launcher
from lora_dist.model_dir import SAFE_INDEX, hash_weight_file
from lora_dist.outputs import OutputError, check_replaceable, read_run_marker, write_failure
from lora_dist.quant import NF4Record, nf4_record
from lora_dist.ranks import RankGroup
from lora_dist.safetensors_file import write_safetensors

__all__ = [
    "CheckpointManager",
    "ResumeError",
    "TrainingDiverged",
    "base_identity",
    "load_state",
    "save_state",
]

log = logging.getLogger(__name__)

LATEST = "latest"
#: The ``lora.*`` settings a checkpoint records; resuming with any of them changed is refused.
LORA_SETTINGS = ("r", "alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
                 "rank_pattern", "alpha_pattern")
#: The ``train.*`` settings a checkpoint records: the LR schedule and AdamW's. A resume with any of them changed goes on
#: with the new values from the checkpoint's step, with a warning naming them.
TRAIN_SETTINGS = ("steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm")
#: A checkpoint dir's name.
STEP_DIR = re.compile(r"step-(\d+)")
#: What a writer killed mid-publish leaves in ``checkpoints/`` (:mod:`lora_dist.atomic`).
_LEFTOVER = re.compile(r"\.(step-\d+)\.(tmp|old|del)-.*")
_MAX_STATE_BYTES = 1 << 20


class ResumeError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed as asked."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss, gradients or LoRA state became NaN/Inf, or the LoRA weights exploded."""


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
        hash_weight_file(h, f, (size * i // samples for i in range(samples)), sample_bytes)
    return {"path": str(root.resolve()), "sha256": h.hexdigest()}


def _lora_settings(cfg: Config) -> dict:
    """The recorded ``lora.*`` settings, as they read back from JSON."""
    return json.loads(json.dumps({k: getattr(cfg.lora, k) for k in LORA_SETTINGS}))


def _train_settings(cfg: Config) -> dict:
    """The recorded ``train.*`` settings (:data:`TRAIN_SETTINGS`), as they read back from JSON."""
    return json.loads(json.dumps({k: getattr(cfg.train, k) for k in TRAIN_SETTINGS}))


def _global_batch(cfg: Config, world_size: int) -> int:
    """Sequences a step learns from: ``world_size x train.micro_batch_size x train.grad_accum``."""
    return world_size * cfg.train.micro_batch_size * cfg.train.grad_accum


def _check_finite(tensors: dict[str, torch.Tensor], step: int) -> None:
    bad = next((k for k, v in tensors.items() if not all_finite(v)), None)
    if bad is not None:
        raise TrainingDiverged(f"{bad} is not finite at step {step}; checkpoint not written, the last good one is kept. "
                               "Lower train.lr or check the data")


def data_record(data, cfg: Config) -> dict:
    """What ``state.json`` records of the training blocks (a :class:`~lora_dist.data.PackedDataset`): their count,
    length and fingerprint, and ``train.seed``, which orders them."""
    return {"blocks": len(data), "seq_len": int(data.input_ids.shape[1]), "sha256": data.fingerprint(),
            "seed": cfg.train.seed}


def _record(cfg: Config, step: int, samples_consumed: int, world_size: int, run_id: str | None,
            engine=None, data=None, resumed_from: str | None = None, job: dict[str, str] | None = None) -> dict:
    """A checkpoint's ``state.json`` (with ``engine``'s NF4 weights under ``model.quantize``, what
    :func:`data_record` says of ``data``, the training blocks, the ``checkpoint.resume=DIR`` the run's steps go
    on from, and the launch that saved it (:func:`~lora_dist.launch.detect.launch_identity`), where known)."""
    record = {
        "step": step,
        "samples_consumed": samples_consumed,
        "run_id": run_id,
        "base": base_identity(cfg.model.path),
        "world_size": world_size,
        "global_batch": _global_batch(cfg, world_size),
        "strategy": cfg.parallel.strategy,
        "lora": _lora_settings(cfg),
        "quantize": cfg.model.quantize,
        "train": _train_settings(cfg),
    }
    if run_id is None:
        del record["run_id"]
    if data is not None:
        record["data"] = data_record(data, cfg)
    if resumed_from is not None:
        record["resumed_from"] = resumed_from
    if job:
        record["job"] = job
    nf4 = _nf4(engine)
    if nf4 is not None:  # which weights are NF4 depends on the sharding (lora_dist.quant.NF4Record)
        record["quantized"], record["quantized_shards"] = list(nf4.weights), nf4.shards
    return record


def _write_files(staging: Path, lora: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], record: dict) -> None:
    write_safetensors(staging / "lora.safetensors", {k: v.cpu().contiguous() for k, v in lora.items()})
    write_safetensors(staging / "optimizer.safetensors", {k: v.contiguous() for k, v in moments.items()})
    (staging / "state.json").write_text(json.dumps(record, indent=2) + "\n")


#: What a checkpoint dir holds (:func:`_write_files`).
CHECKPOINT_FILES = ("lora.safetensors", "optimizer.safetensors", "state.json")


def save_state(directory: str | Path, step: int, engine, cfg: Config, samples_consumed: int) -> Path:
    """Write ``engine``'s training state as a checkpoint dir another loop resumes (collective; rank 0 writes).

    The same files :class:`CheckpointManager` writes, published atomically (a previous ``directory`` is
    replaced once the new one is complete), without a run id: ``checkpoint.resume=DIR`` reads it.

    Raises:
        OutputError: ``directory`` is a file or holds anything but a checkpoint's files (nothing is written).
        TrainingDiverged: a LoRA tensor or AdamW moment is NaN/Inf (nothing is written).
        OutputDirError: the dir could not be written; a previous one there is intact.
    """
    directory = Path(directory)
    state = engine.state_dict()
    lora, moments = state["lora"], state["optimizer"]
    _check_finite({**lora, **moments}, step)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def write() -> Path:
        from safetensors import SafetensorError

        check_replaceable(directory, CHECKPOINT_FILES, "a checkpoint", OutputError)
        try:
            with writing_dir(directory, replace=True) as staging:
                _write_files(staging, lora, moments, _record(cfg, step, samples_consumed, world, None, engine))
        except (OSError, SafetensorError) as e:
            raise write_failure(e, f"checkpoint {directory}", "a previous one there is intact") from None
        return directory

    return RankGroup().on_rank0(write)


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint dir's ``state.json``, LoRA tensors and AdamW moments (safetensors only), checked.

    Raises:
        ResumeError: an unreadable or corrupt file, or a LoRA tensor holding NaN/Inf.
    """
    state = read_state(path)
    try:
        lora = load_file(str(path / "lora.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors"))
    except Exception as e:  # missing file, truncated or corrupt safetensors
        raise ResumeError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    bad = next((k for k, v in lora.items() if not all_finite(v)), None)
    if bad is not None:
        raise ResumeError(f"{path}: {bad} holds NaN/Inf")
    return state, lora, moments


def load_state(path: str | Path, engine, cfg: Config) -> dict:
    """Restore a checkpoint dir (any strategy, world size or loop wrote it) into ``engine``; returns its ``state.json``.

    Raises:
        ResumeError: unreadable, or trained on another base (unless ``checkpoint.force``) or with other
            LoRA settings, names or shapes; nothing is loaded then.
    """
    path = Path(path)
    state, lora, moments = read_checkpoint(path)
    _check_compatible(path, state, lora, engine, cfg)
    engine.load_state_dict({"lora": lora, "optimizer": moments}, state["step"])
    return state


def _check_compatible(path: Path, state: dict, lora: dict[str, torch.Tensor], engine, cfg: Config) -> None:
    """Refuse a checkpoint of another base (unless ``checkpoint.force``) or whose LoRA settings, names or shapes
    differ from this run's (before any copy)."""
    ident = base_identity(cfg.model.path)
    if state.get("base", {}).get("sha256") != ident["sha256"] and not cfg.checkpoint.force:
        raise ResumeError(
            f"{path} was trained on base {state.get('base', {}).get('path')!r}, not {ident['path']!r} "
            "(config/weights differ); use the same model.path or set checkpoint.force=true"
        )
    fresh = "or start a fresh output.dir"
    current = _lora_settings(cfg)
    for key, saved in state.get("lora", {}).items():
        if key in current and current[key] != saved:
            was, now = f"lora.{key}={json.dumps(saved)}", f"lora.{key}={json.dumps(current[key])}"
            raise ResumeError(f"{path} was trained with {was}, this run has {now}; resume with {was} {fresh}")
    if "quantize" in state and state["quantize"] != cfg.model.quantize:  # older checkpoints record NF4 runs only

        def setting(value) -> str:
            return f"model.quantize={value}" if value else 'model.quantize="" (no quantization)'

        raise ResumeError(f"{path} was trained with {setting(state['quantize'])}, this run has "
                          f"{setting(cfg.model.quantize)} (another base to train against); resume with "
                          f"{setting(state['quantize'])} {fresh}")
    saved, now = nf4_record_of(state), _nf4(engine)
    if saved is not None and saved.weights and now is None:
        raise ResumeError(f"{path} was trained with model.quantize=nf4 ({len(saved.weights)} NF4 weights); resume "
                          f"with model.quantize=nf4 {fresh}")
    if saved is not None and now is not None and set(saved.weights) != set(now.weights):
        name = sorted(set(saved.weights) ^ set(now.weights))[0]
        was, here = ("NF4", "unquantized") if name in saved.weights else ("unquantized", "NF4")
        raise ResumeError(f"{path} was trained with {name} {was}, its base's rows split over {saved.shards} rank(s); "
                          f"split over {now.shards} here it is stored {here} (the NF4 weights depend on the split): "
                          f"resume with the base split over {saved.shards} (parallel.strategy, parallel.dp_shard) "
                          f"{fresh}")
    shapes = {k: list(v.shape) for k, v in engine.lora_state_dict().items()}
    if set(lora) != set(shapes):
        raise ResumeError(f"{path}: its LoRA tensors do not match this model's LoRA layers (lora.* changed?); "
                          f"resume with the original lora.* settings {fresh}")
    for name, shape in shapes.items():
        if list(lora[name].shape) != shape:
            raise ResumeError(f"{path}: {name} is {list(lora[name].shape)} in the checkpoint but {shape} in this "
                              f"model (another base?); resume on the base it was trained on {fresh}")


def _same_dir(path: str | Path, named: str) -> bool:
    return os.path.realpath(path) == os.path.realpath(named)


def _warn_changed_training(path: Path, state: dict, cfg: Config, world_size: int) -> None:
    """Warn where the LR schedule, AdamW's settings or the global batch (another world size, micro-batch or
    accumulation) differ from those the checkpoint was trained with: the run goes on from the checkpoint's step with
    the new ones (a longer ``train.steps`` stretches the schedule; a step learns from another number of sequences)."""
    saved, now = state.get("train"), _train_settings(cfg)
    if not isinstance(saved, dict):
        return
    changed = [f"train.{k}={json.dumps(saved[k])} -> {json.dumps(now[k])}" for k in TRAIN_SETTINGS
               if k in saved and saved[k] != now[k]]
    batch = _global_batch(cfg, world_size)
    if isinstance(state.get("global_batch"), int) and state["global_batch"] != batch:
        t = cfg.train
        changed.append(f"global batch {state['global_batch']} -> {batch} sequences a step (world size {world_size} x "
                       f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum={t.grad_accum})")
    if changed:
        log.warning("%s was trained with other settings: %s; training goes on from step %d with this run's (the LR "
                    "at a step is a function of train.steps, lr, warmup_steps and min_lr_ratio)", path,
                    ", ".join(changed), state["step"])


def _check_data(path: Path, state: dict, data, cfg: Config) -> None:
    """Refuse to resume on other training blocks or another order than the checkpoint's (unless
    ``checkpoint.force``): it would go on at ``samples_consumed`` of another sample stream."""
    saved = state.get("data")
    if data is None:
        return
    if saved is None:
        log.info("%s records no data fingerprint (an older lora_dist, or lora_dist.checkpoint.save_state): the data "
                 "it was trained on is not checked", path)
        return
    now = data_record(data, cfg)
    if saved.get("seed") != now["seed"]:
        problem = (f"train.seed={json.dumps(saved.get('seed'))}, this run has train.seed={now['seed']} (another "
                   "sample order)")
        fix = f"resume with train.seed={json.dumps(saved.get('seed'))}"
    elif saved.get("sha256") != now["sha256"]:
        problem = (f"other data blocks ({saved.get('blocks')} blocks of {saved.get('seq_len')} tokens; this run has "
                   f"{now['blocks']} of {now['seq_len']}): data.path or its files, the tokenizer or chat template, "
                   "data.loss_on, data.packing, data.long_documents (auto truncates a long document with a prompt, "
                   "earlier versions split it: data.long_documents=split), data.eval_fraction, train.seq_len or "
                   "lora_dist's token format changed")
        fix = "resume on the same data"
    else:
        return
    where = f"sample {state.get('samples_consumed', 0)} of this run's stream"
    if not cfg.checkpoint.force:
        raise ResumeError(f"{path} was trained with {problem}; {fix}, or set checkpoint.force=true to go on from "
                          f"{where}, or start a fresh output.dir")
    log.warning("checkpoint.force=true: %s was trained with %s; going on from %s", path, problem, where)


def _nf4(engine) -> NF4Record | None:
    """The weights ``engine``'s model stores as NF4 (``model.quantize``), a :class:`~lora_dist.quant.NF4Record`;
    None without quantization."""
    model = getattr(engine, "module", None)
    return None if model is None else nf4_record(model)


def nf4_record_of(state: dict) -> NF4Record | None:
    """The :class:`~lora_dist.quant.NF4Record` a checkpoint's ``state.json`` (:func:`read_state`) carries, or None."""
    if "quantized" not in state:
        return None
    return NF4Record(tuple(state["quantized"]), state.get("quantized_shards", 1))


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json``, checked: a JSON object with a positive ``step`` (the dir's own, for a
    ``step-N`` dir), a non-negative ``samples_consumed`` and a string ``run_id`` where present.

    Raises:
        ResumeError: one line naming the file and what is wrong with it.
    """
    f = path / "state.json"
    try:
        if f.stat().st_size > _MAX_STATE_BYTES:
            raise ValueError(f"{f.stat().st_size} bytes, not a lora_dist state.json")
        state = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8, not JSON
        raise ResumeError(f"{path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict):
        raise ResumeError(f"{f} is not a JSON object")
    step = state.get("step")
    if not _is_count(step, 1):
        raise ResumeError(f"{f} has no valid step ({json.dumps(step)[:40]}; a checkpoint's step is a positive integer)")
    named = STEP_DIR.fullmatch(path.name)
    if named and int(named.group(1)) != step:
        raise ResumeError(f"{f} says step {step}, but the dir is {path.name}")
    if "samples_consumed" in state and not _is_count(state["samples_consumed"], 0):
        raise ResumeError(f"{f} has an invalid samples_consumed ({json.dumps(state['samples_consumed'])[:40]})")
    if "run_id" in state and not isinstance(state["run_id"], str):
        raise ResumeError(f"{f} has an invalid run_id")
    for key in ("base", "lora", "data"):
        if key in state and not isinstance(state[key], dict):
            raise ResumeError(f"{f} has an invalid {key!r} entry")
    quantized = state.get("quantized", [])
    if not (isinstance(quantized, list) and all(isinstance(n, str) for n in quantized)) \
            or ("quantized_shards" in state and not _is_count(state["quantized_shards"], 1)):
        raise ResumeError(f"{f} has an invalid 'quantized' or 'quantized_shards' entry")
    return state


def _run_of(path: Path) -> tuple[bool, str | None]:
    """``(readable, run_id)`` of a checkpoint dir: whether its ``state.json`` is a JSON object, and its run id."""
    try:
        state = json.loads((path / "state.json").read_bytes()[:_MAX_STATE_BYTES].decode("utf-8"))
    except (OSError, ValueError):
        return False, None
    if not isinstance(state, dict):
        return False, None
    run_id = state.get("run_id")
    return True, run_id if isinstance(run_id, str) else None


class CheckpointManager:
    """Saves and restores training state under ``<output.dir>/checkpoints``.

    Args:
        root: the checkpoints dir.
        cfg: the run config (``checkpoint.*``, ``train.*``, ``model.path``).
        env: this process's launch environment.
        run_id: the run's id (:func:`lora_dist.outputs.prepare_run_dir`); default: read from the marker
            of ``root``'s parent, or None (no run dir: every readable checkpoint counts as this run's).
        data: the training blocks (a :class:`~lora_dist.data.PackedDataset`): checkpoints record their
            fingerprint, and a resume on other blocks is refused (:func:`_check_data`); None: not recorded.
    """

    def __init__(self, root: Path, cfg: Config, env: LaunchEnv, run_id: str | None = None, data=None) -> None:
        self.root, self.cfg, self.env, self.data = Path(root), cfg, env, data
        if run_id is None:
            marker = read_run_marker(self.root.parent)
            run_id = marker["run_id"] if marker else None
        self.run_id = run_id
        self.samples_offset = 0
        self.resumed_step = 0
        self.resumed_from: str | None = None  # the checkpoint.resume=DIR this run's steps go on from (state.json)
        self.job = launch_identity()  # the launch, recorded in state.json: its restarts know its own checkpoints
        self._read = None  # rank 0: the checkpoint :meth:`_choose` read, for :meth:`maybe_resume`

    def should_save(self, step: int) -> bool:
        """Every ``checkpoint.every`` steps, and at the last step: the finished run's state, for a longer run
        (``train.steps`` raised) to go on from, and its weights where no export writes them."""
        every = self.cfg.checkpoint.every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def _samples(self, step: int) -> int:
        t = self.cfg.train
        done = step - self.resumed_step
        return self.samples_offset + done * t.grad_accum * t.micro_batch_size * self.env.world_size

    # ------------------------------------------------------------------ which dirs are whose

    def _step_dirs(self) -> list[Path]:
        """``step-N`` entries of the checkpoints dir (links included: they are never this run's)."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if STEP_DIR.fullmatch(p.name)),
                      key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))

    def _is_ours(self, path: Path) -> bool:
        """Whether ``path`` is a checkpoint dir of this run (by the run id in its ``state.json``)."""
        if path.is_symlink() or not path.is_dir():
            return False
        readable, run_id = _run_of(path)
        return readable and (run_id is None or self.run_id is None or run_id == self.run_id)

    def _foreign(self, path: Path) -> str | None:
        """Why ``path`` is not this run's checkpoint (one line with the fix), or None when it is."""
        move = f"move it out of {self.root} (or delete it) or choose a new output.dir"
        if path.is_symlink() or not path.is_dir():
            kind = "a symlink" if path.is_symlink() else "a file"
            return f"{path} is not a checkpoint dir lora_dist wrote ({kind}); {move}"
        readable, run_id = _run_of(path)
        if not readable:
            return f"{path} has no readable state.json, so lora_dist cannot tell which run wrote it; {move}"
        if run_id is not None and self.run_id is not None and run_id != self.run_id:
            return (f"{path} belongs to another run (run id {run_id}; this output.dir's run is {self.run_id}) and is "
                    f"never resumed, pruned or replaced by this one; {move}, or resume from it explicitly with "
                    f"checkpoint.resume={path}")
        return None

    def _recover(self) -> None:
        """Rank 0, before anything reads the dir: undo what writers killed mid-save left (:func:`atomic.recover`)."""
        if not self.root.is_dir():
            return
        try:
            for entry in list(self.root.iterdir()):
                leftover = _LEFTOVER.fullmatch(entry.name)
                if leftover and leftover.group(2) == "del":  # a pruned checkpoint whose deletion was cut short
                    shutil.rmtree(entry, ignore_errors=True)
                elif leftover:
                    recover(self.root / leftover.group(1))
                elif entry.name.startswith(f".{LATEST}.tmp-"):
                    entry.unlink(missing_ok=True)
        except OSError as e:
            raise write_failure(e, str(self.root), "choose another output.dir") from None

    # ------------------------------------------------------------------ save

    def save(self, step: int, engine) -> Path | None:
        """Write a checkpoint for ``step`` (collective; rank 0 writes, the other ranks wait for it).

        Raises:
            TrainingDiverged: a LoRA tensor or AdamW moment is NaN/Inf (on every rank; nothing is written).
            OutputDirError: the checkpoint could not be written (a full disk...); the previous one and
                ``latest`` are intact (on every rank).
            OutputError: ``step-N`` exists and is not this run's (on every rank; nothing is written).
        """
        state = engine.state_dict()
        lora, moments = state["lora"], state["optimizer"]
        _check_finite({**lora, **moments}, step)
        final = self.root / f"step-{step:06d}"

        def write() -> None:
            if final.exists() or final.is_symlink():
                problem = self._foreign(final)
                if problem is not None:
                    raise OutputError(f"cannot replace {final}: {problem}")
            record = _record(self.cfg, step, self._samples(step), self.env.world_size, self.run_id, engine, self.data,
                             self.resumed_from, self.job)
            previous = self._latest_name()
            from safetensors import SafetensorError

            try:
                with writing_dir(final, replace=True) as staging:
                    _write_files(staging, lora, moments, record)
                write_text_atomic(self.root / LATEST, final.name + "\n")
            except (OSError, SafetensorError) as e:
                kept = f"checkpoint {previous} and latest are intact" if previous else "no earlier checkpoint existed"
                raise write_failure(e, f"checkpoint {final.name} in {self.root}", f"the previous {kept}") from None
            self._prune(step)
            log.info("checkpoint saved: %s", final)

        RankGroup().on_rank0(write)
        return final

    def _latest_name(self) -> str | None:
        """The dir name ``latest`` holds, if it is a well-formed ``step-N`` name (never a path)."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if STEP_DIR.fullmatch(name) else None

    def _prune(self, saved: int) -> None:
        """Keep this run's newest ``checkpoint.keep`` up to step ``saved``; drop this run's after it (a rollback)."""
        keep = self.cfg.checkpoint.keep
        ours = []
        for path in self._step_dirs():
            if not self._is_ours(path):
                continue
            try:
                ours.append((read_state(path)["step"], path))
            except ResumeError:
                continue  # this run's but broken: replaced when its step is saved again, never guessed at
        ours.sort()
        done = [path for step, path in ours if step <= saved]
        rolled_back = [path for step, path in ours if step > saved]
        old = done[:-keep] if keep > 0 else []
        for path in old + rolled_back:
            if path.name != f"step-{saved:06d}":
                try:  # renamed .step-N.del-* first: a deletion cut short leaves no step-N without its state
                    discard(path)
                except OSError as e:
                    log.warning("could not remove the old checkpoint %s (%s); it is kept", path, e)
        try:
            entries = list(self.root.iterdir())
        except OSError as e:  # the checkpoint is written and `latest` names it: only the pruning is left undone
            log.warning("could not list %s to remove old checkpoints (%s); the next save tries again", self.root, e)
            return
        for entry in entries:  # staging dirs of writers that were killed, and deletions that were cut short
            leftover = _LEFTOVER.fullmatch(entry.name)
            if leftover and leftover.group(2) in ("tmp", "del"):
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ resume

    def _check_fresh_start(self, dirs: list[Path], restart: str | None = None, launch: str | None = None) -> None:
        """``checkpoint.resume=never``: refused where a ``step-*`` dir would be mixed with the new run's (on a
        restart: they are another launch's, or this ``launch`` is not known and the fix says how to resume its
        own)."""
        if dirs:
            shown = ", ".join(p.name for p in dirs[-3:])
            if restart and launch:
                raise ResumeError(
                    f"{self.root} holds checkpoints another launch saved ({shown}), not this one's, at a {restart}; "
                    "checkpoint.resume=never would mix a new run with them: continue that run with "
                    f"checkpoint.resume=auto, or move {self.root} away (or delete it), or choose a new output.dir")
            if restart:  # this job's own, or an earlier job's: the launch does not say which
                raise ResumeError(
                    f"{self.root} holds checkpoints ({shown}) at a {restart}, and lora_dist cannot tell whether this "
                    "job's first start saved them (torchrun without --standalone names every job by its --rdzv-id); "
                    "checkpoint.resume=never would mix a new run with them: launch with checkpoint.resume=auto (the "
                    f"default) to go on from them on a restart, or move {self.root} away, or choose a new output.dir")
            raise ResumeError(
                f"{self.root} already holds checkpoints of an earlier run ({shown}); checkpoint.resume=never would "
                f"mix a new run with them: continue that run with checkpoint.resume=auto, or move {self.root} away "
                "(or delete it), or choose a new output.dir"
            )

    def _auto_candidates(self, dirs: list[Path]) -> list[Path]:
        """``checkpoint.resume=auto``: this run's checkpoint dirs, ``latest``'s first, then by step, newest first.

        Raises:
            ResumeError: a ``step-*`` dir is another run's, or its run cannot be told.
        """
        for path in dirs:
            problem = self._foreign(path)
            if problem is not None:
                raise ResumeError(problem)
        by_step = list(reversed(dirs))
        named = self._latest_name()
        first = [p for p in by_step if p.name == named]
        return first + [p for p in by_step if p.name != named]

    def maybe_resume(self, engine) -> int:
        """Restore the newest readable checkpoint of this run (or the one named); returns the step to start from.

        Collective: rank 0 first puts back what a killed writer set aside, then chooses the checkpoint
        (:meth:`_choose`); every rank reads that one, so all resume at one step even where the ranks see the
        filesystem differently (a node's stale directory cache, a node-local ``checkpoint.resume``), and a
        rank that cannot read it stops every rank.

        Raises:
            ResumeError: see the module docstring (another run's checkpoints, a fresh run over old ones, a
                named checkpoint that is broken, no readable checkpoint of this run, other LoRA settings or base,
                other training blocks or ``train.seed``, a checkpoint another rank cannot read).
        """
        group = RankGroup()
        group.on_rank0(self._recover)
        chosen = group.on_rank0(self._choose)
        if chosen is None:
            return 0
        path = Path(chosen)
        loaded, error = self._read, None  # rank 0 read it while choosing
        self._read = None
        if loaded is None:
            try:
                loaded = read_checkpoint(path)
            except ResumeError as e:
                error = ResumeError(f"{e}; rank 0 read it: every rank must see {path} (a shared output.dir)")
        group.check(error)
        state, lora, moments = loaded
        _check_compatible(path, state, lora, engine, self.cfg)
        group.on_rank0(lambda: _check_data(path, state, self.data, self.cfg))  # one rank reads the blocks through
        engine.load_state_dict({"lora": lora, "optimizer": moments}, state["step"])
        self.resumed_step = state["step"]
        explicit = self.cfg.checkpoint.resume not in ("auto", "never") and _same_dir(path, self.cfg.checkpoint.resume)
        self.resumed_from = os.path.realpath(path) if explicit else state.get("resumed_from")
        self.samples_offset = state.get("samples_consumed", 0)
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, state["step"])
            _warn_changed_training(path, state, self.cfg, self.env.world_size)
            if self.cfg.checkpoint.resume == "auto" and self._latest_name() != path.name:
                self._point_latest(path)
        return state["step"]

    def _choose(self) -> str | None:
        """Rank 0: the checkpoint to resume from (the newest readable one of this run, or the one named), or
        None to start fresh.

        Raises:
            ResumeError: as :meth:`maybe_resume`.
        """
        resume = self.cfg.checkpoint.resume
        dirs = self._step_dirs()
        restart = job_restart()
        if resume == "never":
            launcher = restarting_launcher()
            launch = self.job.get(launcher) if launcher else None  # this launch, as its restarter knows it
            if not (launch and dirs and all(self._saved_by(p, launcher, launch) for p in dirs)):
                self._check_fresh_start(dirs, restart, launch)
                return None
            # Its first start began fresh (it found no checkpoint), and every one here is its own since.
            log.warning("%s: resuming this job's latest checkpoint in %s (checkpoint.resume=never holds for the "
                        "job's first start)", restart, self.root)
            resume = "auto"
        if resume != "auto" and restart and any(self._continues(p, resume) for p in dirs):
            log.warning("%s: resuming this run's latest checkpoint in %s, not checkpoint.resume=%s, which the job's "
                        "first start resumed (the run has saved checkpoints since)", restart, self.root, resume)
            resume = "auto"
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise ResumeError(f"checkpoint.resume={resume!r} is not a checkpoint dir")
            self._read = read_checkpoint(path)
            return str(path)
        skipped: list[str] = []
        for path in self._auto_candidates(dirs):
            try:
                self._read = read_checkpoint(path)
            except ResumeError as e:
                skipped.append(str(e))
                log.warning("skipping corrupt checkpoint: %s; falling back to the previous one", e)
                continue
            return str(path)
        if skipped:
            raise ResumeError(f"no readable checkpoint of this run in {self.root} ({skipped[0]}); repair or remove "
                              f"the broken checkpoints (or move {self.root} away) to start over, or choose a new "
                              "output.dir")
        return None

    def _saved_by(self, path: Path, launcher: str, launch: str) -> bool:
        """Whether ``path`` is a checkpoint of this run saved by ``launch`` (as ``launcher``, which restarts it,
        names it: :func:`~lora_dist.launch.detect.launch_identity`)."""
        if not self._is_ours(path):
            return False
        try:
            job = read_state(path).get("job")
        except ResumeError:
            return False
        return isinstance(job, dict) and job.get(launcher) == launch

    def _continues(self, path: Path, resume: str) -> bool:
        """Whether ``path`` is a checkpoint of this run saved after it resumed ``resume`` (its ``resumed_from``):
        a restart goes on from those, never from one the resume of ``resume`` rolled back from."""
        if not self._is_ours(path):
            return False
        try:
            recorded = read_state(path).get("resumed_from")
            return recorded is not None and _same_dir(recorded, resume)
        except ResumeError:
            return False

    def _point_latest(self, path: Path) -> None:
        """Rank 0: ``latest`` names the checkpoint resumed (it named a broken or missing one)."""
        try:
            write_text_atomic(self.root / LATEST, path.name + "\n")
        except OSError as e:
            log.warning("could not point %s at %s (%s); the next checkpoint replaces it", self.root / LATEST,
                        path.name, e.strerror or e)
