"""The one training loop, shared by every strategy.

Per optimizer step: count the step's target tokens on all ranks, run
``grad_accum`` micro-batches (fsdp2, ddp, zero1: communication only on the last;
ZeRO-2/3 reduce-scatter every micro-batch's gradients), clip the LoRA
gradients' global norm, update with AdamW on a warmup + cosine schedule.
The loss is the global token mean, so N ranks compute exactly what one
process computes on the same global batch.

What a run may write where is :mod:`lora_dist.outputs` (the run dir) and
:mod:`lora_dist.checkpoint` (its contract). Rank 0 makes ``output.dir`` a run dir
only once the inputs are validated, so bad input leaves nothing behind.

Two guards beyond NaN/Inf:

* **Exploding LoRA weights.** After every update the largest LoRA weight magnitude
  (all ranks) is compared with :data:`LORA_WEIGHT_LIMIT`. Trained LoRA weights stay
  near 1 (AdamW moves each by about ``lr`` per step), so a weight beyond 1e4 means
  the step blew up, e.g. ``train.lr=1e30`` puts ``lora_B`` at 1e30 in one step while
  the loss and grad norm stay finite (the saturated model has a zero gradient).
  The run stops naming the step, the tensor and the lr; nothing of that step is saved.
* **Steps without target tokens.** A global batch whose every label is masked
  (prompts longer than ``train.seq_len``...) has no loss: its metrics row has
  ``"loss": null`` and ``"target_tokens": 0``, it is left out of the first/final
  loss, and a warning names the step. Its update is taken as for any step (a zero
  gradient: AdamW's momentum and weight decay only), so the schedule, the data
  position and exact resume are those of every other step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lora_dist import checkpoint as ckpt_mod
from lora_dist.adapter import check_adapter_dir
from lora_dist.atomic import recover, write_text_atomic
from lora_dist.chat import configured_template
from lora_dist.checkpoint import TrainingDiverged
from lora_dist.config import Config, config_to_dict
from lora_dist.data import PackedDataset, load_splits, load_tokenizer
from lora_dist.errors import ConfigError, UserError
from lora_dist.export import ExportError, merge_targets
from lora_dist.launch import LaunchEnv, init_distributed, run_device
from lora_dist.loss import n_targets
from lora_dist.model_dir import ModelDir
from lora_dist.outputs import OutputDirError, OutputError, RunLock, prepare_run_dir, write_failure
from lora_dist.parallel import Engine, check_replicas
from lora_dist.preemption import PREEMPT_EXIT_CODE, Preempted, PreemptionHandler, stop_exits
from lora_dist.ranks import RankGroup
from lora_dist.session import build, check_launch, open_base, resolve_strategy, strategy_config
from lora_dist.sources import input_paths
from lora_dist.tracking import Tracker, check_backends, open_tracker

__all__ = [
    "LORA_WEIGHT_LIMIT",
    "Batches",
    "OutputDirError",
    "TrainResult",
    "TrainingDiverged",
    "all_sum",
    "eval_blocks",
    "eval_sums",
    "evaluate",
    "forward_backward",
    "lr_at",
    "train",
    "truncate_metrics",
]

log = logging.getLogger("lora_dist")

#: The largest LoRA weight magnitude a run may reach; beyond it the step is taken as diverged.
LORA_WEIGHT_LIMIT = 1e4


@dataclass
class TrainResult:
    final_loss: float
    first_loss: float
    eval_loss: float | None
    steps: int
    output_dir: Path
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum ``value`` over all ranks, in place (a no-op for one process). Pass tensors on the run's device."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def _memory_gb(device: torch.device) -> float:
    """The peak of this step: on CUDA the allocator's peak since the step began, on the CPU the process RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


class Batches:
    """This rank's share of the global micro-batch stream (see :mod:`lora_dist.data`)."""

    def __init__(self, data: PackedDataset, micro_batch: int, env: LaunchEnv, seed: int, device: torch.device,
                 first_micro: int = 0, sample_offset: int = 0):
        self.data, self.micro, self.env, self.seed, self.device = data, micro_batch, env, seed, device
        self.global_micro = micro_batch * env.world_size
        self.first_micro, self.sample_offset = first_micro, sample_offset

    def get(self, k: int) -> dict:
        """The ``k``-th micro-batch of the run (counting from the start, also after a resume): its model
        inputs and labels, on the run's device (:meth:`lora_dist.data.PackedDataset.inputs`)."""
        start = self.sample_offset + (k - self.first_micro) * self.global_micro + self.env.rank * self.micro
        return self.data.micro_batch(start, self.micro, self.seed, self.device)


def forward_backward(engine: Engine, micro: list[dict]) -> tuple[float, float]:
    """Accumulate the gradient of one optimizer step; returns (global mean loss, global target tokens).

    Each micro-batch's summed token loss is divided by the step's global token
    count, so the accumulated gradient is that of the global token mean.
    Gradients are communicated only on the last micro-batch (DeepSpeed ZeRO-2/3 partition them as they come,
    on every micro-batch). A step with no
    target tokens on any rank has no mean loss: NaN (and a zero gradient).
    """
    device = engine.device
    n_tokens = all_sum(torch.tensor(sum(_targets(b) for b in micro), dtype=torch.float64, device=device))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for m, batch in enumerate(micro):
        sync = contextlib.nullcontext() if m == len(micro) - 1 else engine.no_sync()
        with sync:
            loss = engine.loss_sum(batch)
            engine.backward(loss / n_tokens.to(loss.dtype).clamp(min=1))
        loss_sum += loss.detach().double()
    loss_sum, n_tokens = torch.stack([all_sum(loss_sum), n_tokens]).tolist()  # the step's one wait for the device
    if n_tokens == 0:
        return float("nan"), 0.0
    return loss_sum / n_tokens, n_tokens


def _targets(batch: dict) -> int:
    """The tokens of a micro-batch that carry a loss: counted on the host where it was built
    (:meth:`~lora_dist.data.PackedDataset.inputs`), else from its labels."""
    return batch["n_targets"] if "n_targets" in batch else n_targets(batch["labels"])


def eval_blocks(n_blocks: int, count: int | None) -> list[int]:
    """``count`` of ``n_blocks`` held-out blocks spread evenly over all of them, first to last (every source of a
    mixture, which are packed one after the other), the same whatever the world size; all of them for None."""
    if count is None or count >= n_blocks:
        return list(range(n_blocks))
    return [i * n_blocks // count for i in range(max(count, 1))]


@torch.no_grad()
def eval_sums(engine: Engine, data: PackedDataset, micro_batch: int, blocks: list[int] | None, env: LaunchEnv
              ) -> tuple[float, float]:
    """(summed token loss, target tokens) over all ranks, of the held-out ``blocks`` (:func:`eval_blocks`; ``None``:
    all of them); each block counts once, whatever the world size.

    Every rank runs the same number of forwards (the collectives of a sharded model need it); a rank past the
    last block repeats one and counts nothing from it.
    """
    device = engine.device
    engine.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    blocks = list(range(len(data))) if blocks is None else blocks
    global_micro = micro_batch * env.world_size
    for k in range(max(1, math.ceil(len(blocks) / global_micro))):
        start = k * global_micro + env.rank * micro_batch
        idx = blocks[start:start + micro_batch]
        batch = data.inputs(idx or [0], device)
        loss = engine.loss_sum(batch)
        if idx:  # summed where the loss is, the count added as a number: no wait for the device per batch
            total[0] += loss.double()
            total[1] += _targets(batch)
    engine.model.train()
    total = all_sum(total)
    return float(total[0]), float(total[1])


def evaluate(engine: Engine, data: PackedDataset, micro_batch: int, blocks: list[int] | None, env: LaunchEnv
             ) -> float:
    """Token-mean loss of :func:`eval_sums` (NaN if the blocks hold no target tokens)."""
    loss, tokens = eval_sums(engine, data, micro_batch, blocks, env)
    return loss / tokens if tokens else float("nan")


class _Progress:
    """Rank-0 progress bar (tqdm) with loss, tokens/s and memory."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)

    def update(self, metrics: dict) -> None:
        if self.bar is not None:
            loss = metrics["loss"]
            self.bar.set_postfix(loss="n/a" if loss is None else f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                 mem_gb=f"{metrics['memory_gb']:.2f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: Config, env: LaunchEnv | None = None) -> TrainResult:
    """Run a LoRA fine-tune as configured; call on every rank.

    Writes ``metrics.jsonl``, checkpoints and ``adapter/`` (and ``merged/`` with
    ``export.merged``) under ``output.dir``; what it may create, replace or delete
    there is the contract in :mod:`lora_dist.checkpoint`.

    Raises:
        ConfigError, DataError, ModelDirError: bad input, before anything is written.
        OutputError: ``output.dir`` is an input, touches one, holds files lora_dist did not write, is in use
            by another run, or already holds ``merged/`` without ``output.overwrite``; before any work.
        OutputDirError: ``output.dir`` cannot be written (permissions, a full disk), naming what is intact.
        ResumeError: the checkpoints cannot be resumed as asked (see :mod:`lora_dist.checkpoint`).
        TrainingDiverged: a NaN/Inf loss or grad norm, or exploding LoRA weights, naming the step; nothing
            is saved from it.
    """

    # Until training starts a stop signal ends the rank for a requeue (nothing to save yet); then the same handlers
    # turn it into a checkpoint at the next step boundary.
    with stop_exits(requeue=cfg.checkpoint.resume in ("auto", "never")) as signals, \
            contextlib.ExitStack() as held:
        env = env or init_distributed(cfg.parallel.timeout_s, allow_batch_shell=False)
        check_launch(cfg, env)
        device = run_device()
        out = Path(cfg.output.dir)

        base = open_base(cfg, env)  # fails fast (on every rank) on a missing or corrupt model dir; opened once
        cfg = resolve_strategy(cfg, env, device)  # parallel.strategy=auto: the planner's choice, in config.json
        tokenizer = load_tokenizer(cfg.model.path)  # never runs code from the model dir
        hf_config = base.hf_config
        max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
        train_data, eval_data = load_splits(cfg, tokenizer, max_pos, verbose=env.is_main)

        ds_config = strategy_config(cfg, base)
        # a missing tracker package stops the run before any work, on every rank (it stopped rank 0 alone, the
        # others left waiting for it until the timeout)
        RankGroup().on_rank0(lambda: check_backends(cfg.tracking))
        # Only now, with every input validated: output.dir becomes (or is checked to be) this run's dir.
        marker = _open_run_dir(cfg, env, out, held)
        signals.training()
        return _train_loop(cfg, env, device, out, marker["run_id"], base, train_data, eval_data, ds_config, signals)


def _open_run_dir(cfg: Config, env: LaunchEnv, out: Path, held: contextlib.ExitStack) -> dict:
    """Collective: rank 0 makes ``out`` this run's dir and locks it (released by ``held``, whatever happens after
    the lock is taken); every rank gets the marker (or the error).

    Also refused here, before any work: ``merged/`` exists and ``export.merged`` would replace it without
    ``output.overwrite``; ``adapter/`` is a file or holds anything but an adapter's files. What a killed writer
    set aside is put back (``adapter/``, ``merged/``).
    """

    def prepare() -> dict:
        marker = prepare_run_dir(out, [cfg.model.path, *input_paths(cfg.data)])
        lock = RunLock(out)
        held.callback(lock.release)  # before the lock is taken: a stop signal right after it cannot leak it
        lock.acquire()
        merged = out / "merged"
        try:
            recover(out / "adapter")
            recover(merged, cleanup=False)  # a merge may be writing there: never remove its staging dir
        except OSError as e:
            raise write_failure(e, f"the run dir {out}", "choose another output.dir") from None
        # After the recovery: an export a killed overwrite set aside is back, and refused now, not after training.
        if cfg.export.merged and os.path.lexists(merged) and not cfg.output.overwrite:
            raise OutputError(f"{merged} already exists and export.merged=true would replace it; set "
                              "output.overwrite=true to replace it, export.merged=false, or choose a new output.dir")
        if cfg.export.adapter:  # what the adapter writer would refuse (a file; a dir holding other files)
            check_adapter_dir(out / "adapter")
        return marker

    return RankGroup().on_rank0(prepare)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop ``metrics.jsonl``'s rows after ``step`` (and torn lines), atomically; a resumed run logs them again.

    Raises:
        OutputDirError: the file cannot be rewritten.
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return
    except OSError as e:
        raise write_failure(e, str(path), "choose another output.dir") from None
    kept, changed = [], bool(text) and not text.endswith("\n")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a kill mid-write
            changed = True
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            changed = True
            continue
        kept.append(line)
    if changed:
        try:
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        except OSError as e:
            raise write_failure(e, str(path), "the previous file is intact") from None


def _append_metrics(path: Path, record: dict) -> None:
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise write_failure(e, str(path), "checkpoints written so far are intact: rerun to resume") from None


@torch.no_grad()
def _check_lora_weights(engine: Engine, step: int, lr: float) -> None:
    """Collective: stop when a LoRA weight is NaN/Inf or beyond :data:`LORA_WEIGHT_LIMIT` after ``step``.

    Raises:
        TrainingDiverged: on every rank, naming the step, the tensor, its magnitude and the lr.
    """
    named = engine.named_lora_params()
    if not named:
        return
    device = engine.device
    # Each tensor's largest magnitude (NaN where it holds one): one multi-tensor kernel where they share a device
    # and a dtype (fp32 LoRA on the run's device, the engines' case; else per tensor, as before), not two kernels
    # per LoRA tensor. A ZeRO-3 partition may hold none of a tensor here.
    held = [i for i, (_, p) in enumerate(named) if p.numel()]
    largest = torch.zeros(len(named), device=device)
    if held:
        norms = torch._foreach_norm([named[i][1].detach() for i in held], ord=math.inf)
        largest[torch.tensor(held, device=device)] = torch.stack([n.float().to(device) for n in norms])
    largest = torch.nan_to_num(largest, nan=math.inf, posinf=math.inf)  # (posinf: not the largest float)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    worst = int(largest.argmax())
    value = float(largest[worst])
    if value > LORA_WEIGHT_LIMIT:
        what = "is not finite" if not math.isfinite(value) else f"reached {value:.3g}"
        raise TrainingDiverged(
            f"LoRA weights exploded at step {step}: {named[worst][0]} {what} (limit {LORA_WEIGHT_LIMIT:g}; trained "
            f"LoRA weights stay near 1) with train.lr={lr:g}; stopped, nothing of this step is saved, the last good "
            "checkpoint is kept. Lower train.lr (1e-4 to 1e-3 is typical for LoRA)"
        )


def _train_loop(cfg: Config, env: LaunchEnv, device: torch.device, out: Path, run_id: str, base: ModelDir,
                train_data: PackedDataset, eval_data: PackedDataset | None, ds_config: dict | None,
                signals: PreemptionHandler) -> TrainResult:
    """Everything after the run dir is open: load, resume, the steps, the outputs (every rank). A preemption signal
    during the load or the resume (``signals``, in their training phase) stops at the first step boundary."""
    t, p = cfg.train, cfg.parallel
    model, engine = build(cfg, env, device, base, ds_config)
    if cfg.export.merged:  # a layer the merged export cannot write is refused now, not after the whole run
        try:
            merge_targets(model, base)
        except ExportError as e:
            raise ConfigError(f"{e}, or set export.merged=false to write the adapter alone") from None

    template = configured_template(cfg.data.chat_template)  # the outputs carry it: read now, not after the run
    manager = ckpt_mod.CheckpointManager(out / "checkpoints", cfg, env, run_id=run_id, data=train_data)
    start_step = manager.maybe_resume(engine)
    if start_step > t.steps:  # (every rank resumed the same step) before the run's files are touched
        raise ckpt_mod.ResumeError(
            f"the checkpoint resumed is at step {start_step}, past train.steps={t.steps}: nothing to train, and the "
            f"outputs would be its weights under this config; set train.steps above {start_step} to go on, resume an "
            "earlier checkpoint with checkpoint.resume=DIR, or choose a new output.dir")
    metrics_path = out / "metrics.jsonl"

    def record_start() -> None:  # only now: a rerun that fails validation or resume keeps the run's files
        if start_step == 0 and os.path.lexists(out / "adapter") and not cfg.output.overwrite:
            raise OutputError(
                f"{out} holds the adapter of an earlier run and no checkpoint to continue it from; a new run "
                "would replace its config and metrics now and its adapter at the end: set output.overwrite=true "
                "to train it again, or choose a new output.dir (lora-dist export RUN_DIR exports the adapter)")
        try:
            write_text_atomic(out / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
        except OSError as e:
            raise write_failure(e, str(out / "config.json"), "the previous file is intact") from None
        truncate_metrics(metrics_path, start_step)
        trackers.append(open_tracker(cfg.tracking, out, start_step, config_to_dict(cfg), is_main=True))

    trackers: list[Tracker] = []
    RankGroup().on_rank0(record_start)
    tracker = trackers[0] if trackers else Tracker([])  # rank 0's trackers (TensorBoard, MLflow, W&B)
    batches = Batches(train_data, t.micro_batch_size, env, t.seed, device,
                       first_micro=start_step * t.grad_accum, sample_offset=manager.samples_offset)
    history: list[dict] = []
    progress = _Progress(t.steps, start_step, env.is_main)
    first_loss = float("nan")
    eval_loss = None
    end_step = min(t.steps, start_step + t.run_steps) if t.run_steps else t.steps
    ended = "FINISHED"  # what the trackers record: preempted runs are KILLED (the requeued run goes on), else FAILED
    try:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(t.seed * 1_000_003 + step * 1009 + env.rank)  # dropout: a function of (seed, step, rank)
            lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
            micro = [batches.get(step * t.grad_accum + m) for m in range(t.grad_accum)]
            step_loss, n_tokens = forward_backward(engine, micro)
            if n_tokens == 0:
                if env.is_main:
                    log.warning("step %d: no target tokens in the global batch (every label is masked: prompts "
                                "longer than train.seq_len?); no loss to log", step + 1)
            elif not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"loss is {step_loss} at step {step + 1}; stopped before the update, last good checkpoint kept. "
                    "Lower train.lr or check the data"
                )
            grad_norm = engine.step(lr)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(
                    f"grad norm is {grad_norm} at step {step + 1}; stopped, last good checkpoint kept. "
                    "Lower train.lr or check the data"
                )
            _check_lora_weights(engine, step + 1, lr)
            elapsed = time.perf_counter() - t0
            record = {
                "step": step + 1, "loss": step_loss if n_tokens else None, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": float(n_tokens) / elapsed, "step_time_s": elapsed, "memory_gb": _memory_gb(device),
            }
            if not n_tokens:
                record["target_tokens"] = 0
            if math.isnan(first_loss) and n_tokens:
                first_loss = step_loss
            if p.replica_check_every and (step + 1) % p.replica_check_every == 0:
                check_replicas(engine)
            if t.eval_every and eval_data is not None and (step + 1) % t.eval_every == 0:
                eval_loss = record["eval_loss"] = _eval(engine, eval_data, t, env)
            history.append(record)
            if env.is_main and ((step + 1) % t.log_every == 0 or step + 1 == t.steps or "eval_loss" in record):
                _append_metrics(metrics_path, record)
                tracker.log(record)
            progress.update(record)
            stop, on_demand = signals.poll(device)
            if step + 1 == end_step < t.steps:  # train.run_steps: checkpoint and hand over to a later run
                manager.save(step + 1, engine)
                return TrainResult(_final_loss(history), first_loss, eval_loss, step + 1, out, history)
            if manager.should_save(step + 1) or stop or on_demand:
                manager.save(step + 1, engine)
                # a stop during the save: the checkpoint just written is current, exit now (not after one more
                # step and save, which Slurm's KillWait may cut short)
                stop = stop or signals.poll(device)[0]
            if stop:
                if env.is_main:
                    log.warning("preempted: checkpoint at step %d written; exiting with code %d for requeue",
                                step + 1, PREEMPT_EXIT_CODE)
                raise Preempted(step + 1)
        if eval_data is not None:
            eval_loss = _eval(engine, eval_data, t, env)
        if signals.poll(device)[0]:  # a stop during the last step's save or the final eval: the run is trained
            if not manager.should_save(t.steps):  # else the loop just wrote this checkpoint
                manager.save(t.steps, engine)  # the requeued run resumes here and only writes the outputs
            if env.is_main:
                log.warning("preempted after the last step: checkpoint at step %d written; exiting with code %d "
                            "for requeue (the rerun evaluates and writes the adapter and the export)", t.steps,
                            PREEMPT_EXIT_CODE)
            raise Preempted(t.steps)
        if eval_data is not None and env.is_main:  # after the poll: a requeued run logs it once, not twice
            _append_metrics(metrics_path, {"step": t.steps, "eval_loss": eval_loss})
            tracker.log({"step": t.steps, "eval_loss": eval_loss})
    except BaseException as e:
        ended = "KILLED" if isinstance(e, Preempted) else "FAILED"
        raise
    finally:
        progress.close()
        tracker.close(ended)
    # Still under the handler: a stop signal now waits for these writes to finish (each is atomic), instead of
    # killing the process halfway through them; the run is complete once they are.
    if cfg.export.adapter:
        # the fp32 LoRA state, whatever the strategy computes in, with the chat template it was trained with
        engine.save_adapter(out / "adapter", step=t.steps, chat_template=template)
    engine.finish_training()
    if cfg.export.merged:
        try:
            engine.export_merged(out / "merged", dtype=cfg.export.dtype, max_shard_size=cfg.export.max_shard_size,
                                 overwrite=cfg.output.overwrite, keep_fp8=cfg.export.keep_fp8,
                                 chat_template=template)
        except UserError:  # refused or failed on every rank: the training is kept, not lost with the export
            if not cfg.export.adapter:
                _keep_the_adapter(engine, out, env, t.steps, template)
            raise
    if dist.is_initialized():
        dist.barrier()
    if signals.poll(device)[0] and env.is_main:
        log.warning("a stop signal came while the outputs were written; they are complete, the run ends normally")
    return TrainResult(_final_loss(history), first_loss, eval_loss, t.steps, out, history)


def _keep_the_adapter(engine: Engine, out: Path, env: LaunchEnv, step: int, chat_template: str | None) -> None:
    """``export.adapter=false`` and the merged export failed: the adapter is written anyway (``lora-dist export
    RUN_DIR`` exports it once the cause is fixed); a failure to write it is logged, the export's error raised."""
    try:
        engine.save_adapter(out / "adapter", step=step, chat_template=chat_template)
    except UserError as e:
        if env.is_main:
            log.error("the merged export failed and the adapter could not be written either (%s): the training "
                      "is lost", e)
        return
    if env.is_main:
        log.warning("the merged export failed; the trained LoRA is kept in %s (export.adapter=false asked for none): "
                    "lora-dist export %s exports it once the cause is fixed", out / "adapter", out)


def _eval(engine: Engine, eval_data: PackedDataset, t, env: LaunchEnv) -> float | None:
    """The eval loss, or None (with a warning) where the held-out blocks hold no target tokens: of
    ``train.eval_batches`` global batches of blocks spread over the held-out set, the same blocks at every eval and
    for the same global batch whatever the world size (``lora-dist eval`` takes every block)."""
    blocks = eval_blocks(len(eval_data), t.eval_batches * t.micro_batch_size * t.grad_accum * env.world_size)
    loss = evaluate(engine, eval_data, t.micro_batch_size, blocks, env)
    if math.isnan(loss):
        if env.is_main:
            log.warning("no eval loss: the held-out blocks hold no target tokens (every label is masked)")
        return None
    return loss


def _final_loss(history: list[dict]) -> float:
    """The last logged loss (steps without target tokens have none); NaN if no step had one."""
    return next((h["loss"] for h in reversed(history) if h.get("loss") is not None), float("nan"))
