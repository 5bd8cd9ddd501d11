"""The one training loop, shared by every strategy.

Per optimizer step: count the step's target tokens on all ranks, run
``grad_accum`` micro-batches (communication only on the last), clip the LoRA
gradients' global norm, update with AdamW on a warmup + cosine schedule.
The loss is the global token mean, so N ranks compute exactly what one
process computes on the same global batch.
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
import torch.nn.functional as F

from lora_dist import checkpoint as ckpt_mod
from lora_dist.adapter import save_adapter
from lora_dist.atomic import write_text_atomic
from lora_dist.checkpoint import TrainingDiverged
from lora_dist.config import Config, ConfigError, config_to_dict
from lora_dist.data import IGNORE, DataError, PackedDataset, load_dataset
from lora_dist.dtypes import parse_dtype
from lora_dist.launch import LaunchEnv, init_distributed, run_device
from lora_dist.model import load_model
from lora_dist.model_dir import ModelDir, ModelDirError
from lora_dist.parallel import Engine, check_replicas, make_engine

__all__ = [
    "Batches",
    "OutputDirError",
    "TrainResult",
    "TrainingDiverged",
    "all_sum",
    "evaluate",
    "forward_backward",
    "lr_at",
    "n_targets",
    "token_loss_sum",
    "train",
]

log = logging.getLogger("lora_dist")


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


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies in fp32 (labels shifted here, ``-100`` ignored).

    The labels are shifted, not the logits: ``logits[:, :-1]`` of a batch of several sequences is
    not a view of one block, so flattening it would copy the largest activation of the step.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # the last position predicts nothing
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def n_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss (the first position of a sequence predicts nothing)."""
    return int((labels[:, 1:] != IGNORE).sum())


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

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k``-th micro-batch of the run (counting from the start, also after a resume)."""
        start = self.sample_offset + (k - self.first_micro) * self.global_micro + self.env.rank * self.micro
        ids, labels = self.data.batch(start, self.micro, self.seed)
        return ids.to(self.device), labels.to(self.device)


def forward_backward(engine: Engine, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Accumulate the gradient of one optimizer step; returns (global mean loss, global target tokens).

    Each micro-batch's summed token loss is divided by the step's global token
    count, so the accumulated gradient is that of the global token mean.
    Gradients are communicated only on the last micro-batch.
    """
    device = engine.device
    n_tokens = all_sum(torch.tensor(sum(n_targets(labels) for _, labels in micro), dtype=torch.float64, device=device))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for m, (ids, labels) in enumerate(micro):
        sync = contextlib.nullcontext() if m == len(micro) - 1 else engine.no_sync()
        with sync:
            loss = token_loss_sum(engine.model(input_ids=ids).logits, labels)
            engine.backward(loss / n_tokens.to(loss.dtype).clamp(min=1))
        loss_sum += loss.detach().double()
    return float(all_sum(loss_sum) / n_tokens.clamp(min=1)), float(n_tokens)


@torch.no_grad()
def evaluate(engine: Engine, data: PackedDataset, micro_batch: int, batches: int, env: LaunchEnv) -> float:
    """Token-mean loss over the first ``batches`` global micro-batches of the held-out blocks."""
    device = engine.device
    engine.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    global_micro = micro_batch * env.world_size
    n_batches = max(1, min(batches, math.ceil(len(data) / global_micro)))
    for k in range(n_batches):
        start = k * global_micro + env.rank * micro_batch
        idx = [i % len(data) for i in range(start, start + micro_batch)]
        ids, labels = data.input_ids[idx].to(device), data.labels[idx].to(device)
        logits = engine.model(input_ids=ids).logits
        total += torch.tensor([float(token_loss_sum(logits, labels)), n_targets(labels)], dtype=torch.float64,
                              device=device)
    engine.model.train()
    total = all_sum(total)
    return float(total[0] / total[1].clamp(min=1))


class _Progress:
    """Rank-0 progress bar (tqdm) with loss, tokens/s and memory."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)

    def update(self, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                 mem_gb=f"{metrics['memory_gb']:.2f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: Config, env: LaunchEnv | None = None) -> TrainResult:
    """Run a LoRA fine-tune as configured; call on every rank.

    Writes ``metrics.jsonl``, checkpoints and ``adapter/`` (and ``merged/`` with
    ``export.merged``) under ``output.dir``.

    Raises:
        ConfigError, DataError, ModelDirError: bad input, before any training.
        TrainingDiverged: a NaN/Inf loss or grad norm, naming the step; nothing is saved from it.
    """
    from transformers import AutoTokenizer

    env = env or init_distributed(cfg.parallel.timeout_s, allow_batch_shell=False)
    if cfg.parallel.strategy == "none" and env.world_size > 1:
        raise ConfigError(f"parallel.strategy=none runs one process, but {env.world_size} were launched; pick fsdp2, zero3 or ddp")
    if cfg.parallel.strategy in ("zero1", "zero2") and env.is_main:
        log.warning("parallel.strategy=%s does not shard the frozen base: every rank holds all of it "
                    "(only the small LoRA optimizer state/gradients are partitioned); use fsdp2 or zero3 to shard it",
                    cfg.parallel.strategy)
    device = run_device()
    out = Path(cfg.output.dir)
    if env.is_main:
        _check_writable(out)
    t, p = cfg.train, cfg.parallel

    if not cfg.model.path:
        raise ModelDirError("model.path is not set; pass model.path=/path/to/hf_checkpoint")
    base = ModelDir(cfg.model.path)  # fails fast on a missing, incomplete or corrupt model dir; opened once
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    hf_config = base.hf_config
    max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if not cfg.data.path:
        raise DataError("data.path is not set; pass data.path=/path/to/train.jsonl")
    dataset = load_dataset(cfg.data.path, tokenizer, t.seq_len, max_pos)
    train_data, eval_data = dataset.split(cfg.data.eval_fraction)

    ds_config = None
    if p.strategy.startswith("zero"):
        from lora_dist.parallel.deepspeed import deepspeed_config

        ds_config = deepspeed_config(cfg, hf_config)
    # Installed before the model load: a preemption signal during load or resume stops at the first step boundary.
    with ckpt_mod.PreemptionHandler() as signals:
        loaded = load_model(cfg.model, cfg.lora, p, device, t.seed, ds_config, base=base)
        model = loaded.model
        if env.is_main:
            log.info("%s", loaded.report)
        lora_params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(lora_params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        engine = make_engine(model, optimizer, p, t, device, ds_config)

        manager = ckpt_mod.CheckpointManager(out / "checkpoints", cfg, env)
        start_step = manager.maybe_resume(engine)
        if env.is_main:  # only now: a rerun that fails validation or resume keeps the run's config.json
            write_text_atomic(out / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
        batches = Batches(train_data, t.micro_batch_size, env, t.seed, device,
                           first_micro=start_step * t.grad_accum, sample_offset=manager.samples_offset)
        history: list[dict] = []
        metrics_path = out / "metrics.jsonl"
        progress = _Progress(t.steps, start_step, env.is_main)
        first_loss = float("nan")
        eval_loss = None
        end_step = min(t.steps, start_step + t.run_steps) if t.run_steps else t.steps
        try:
            for step in range(start_step, end_step):
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                torch.manual_seed(t.seed * 1_000_003 + step * 1009 + env.rank)  # dropout: a function of (seed, step, rank)
                lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
                micro = [batches.get(step * t.grad_accum + m) for m in range(t.grad_accum)]
                step_loss, n_tokens = forward_backward(engine, micro)
                if not math.isfinite(step_loss):
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
                elapsed = time.perf_counter() - t0
                record = {
                    "step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": float(n_tokens) / elapsed, "step_time_s": elapsed, "memory_gb": _memory_gb(device),
                }
                if step == start_step:
                    first_loss = step_loss
                if p.replica_check_every and (step + 1) % p.replica_check_every == 0:
                    check_replicas(engine)
                if t.eval_every and eval_data is not None and (step + 1) % t.eval_every == 0:
                    eval_loss = record["eval_loss"] = evaluate(engine, eval_data, t.micro_batch_size, t.eval_batches,
                                                               env)
                history.append(record)
                if env.is_main and ((step + 1) % t.log_every == 0 or step + 1 == t.steps):
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                progress.update(record)
                stop, on_demand = signals.poll(device)
                if step + 1 == end_step < t.steps:  # train.run_steps: checkpoint and hand over to a later run
                    manager.save(step + 1, engine)
                    return TrainResult(record["loss"], first_loss, eval_loss, step + 1, out, history)
                if manager.should_save(step + 1) or stop or on_demand:
                    manager.save(step + 1, engine)
                if stop:
                    if env.is_main:
                        log.warning("preempted: checkpoint at step %d written; exiting with code %d for requeue",
                                    step + 1, ckpt_mod.PREEMPT_EXIT_CODE)
                    raise ckpt_mod.Preempted(step + 1)
        finally:
            progress.close()
    if eval_data is not None:
        eval_loss = evaluate(engine, eval_data, t.micro_batch_size, t.eval_batches, env)
        if env.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": t.steps, "eval_loss": eval_loss}) + "\n")
    if cfg.export.adapter:
        lora = engine.lora_state_dict()  # fp32, whatever the strategy computes in (collective under ZeRO)
        if env.is_main:
            save_adapter(model, out / "adapter", cfg.model.path, tensors=lora)
    engine.finish_training()
    if cfg.export.merged:
        from lora_dist.export import export_merged

        export_merged(model, out / "merged", base, dtype=parse_dtype(cfg.export.dtype),
                      max_shard_size=cfg.export.max_shard_size, overwrite=cfg.output.overwrite)
    if dist.is_initialized():
        dist.barrier()
    final = history[-1]["loss"] if history else float("nan")
    return TrainResult(final, first_loss, eval_loss, t.steps, out, history)


class OutputDirError(OSError):
    """``output.dir`` cannot be written."""


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output.dir {str(out)!r} is not writable ({e.strerror or e}); choose another output.dir") from None
