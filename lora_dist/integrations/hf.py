"""lora_dist inside ``transformers.Trainer`` (and its subclasses, such as TRL's ``SFTTrainer``).

Trainer keeps its loop: dataloaders, batch sizes, gradient accumulation, the lr schedule, logging,
evaluation, callbacks, checkpointing and resume. lora_dist takes what it does better:

* the model: built by :func:`lora_dist.prepare` (base sharded without grads or optimizer state, LoRA
  replicated); Trainer and accelerate never wrap it again (no DDP around FSDP2, no second FSDP);
* each micro-batch: the global token-mean loss (:func:`lora_dist.loss.token_loss_sum` over the step's
  target tokens on all ranks), ``engine.backward``, ``engine.no_sync`` but on the last micro-batch;
* each optimizer step: ``engine.step(lr)`` (LoRA all-reduce, clipping to ``max_grad_norm``, AdamW) with the
  lr Trainer's scheduler set;
* ``save_model(dir)``: a PEFT adapter from any strategy; :meth:`LoraDistMixin.export_merged`: the merged
  checkpoint from the shards;
* checkpoints: ``checkpoint-N/lora_dist/`` holds the training state in lora_dist's safetensors format
  (:func:`lora_dist.checkpoint.save_state`), which ``lora-dist train checkpoint.resume=DIR`` resumes too,
  and Trainer's ``scheduler.json``; no pickled optimizer. Trainer's own ``trainer_state.json`` (JSON) and
  ``rng_state*.pth`` (read by Trainer with ``torch.load(weights_only=True)``) are kept as Trainer writes them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer

from lora_dist.adapter import ADAPTER_CONFIG
from lora_dist.atomic import fsync, write_text_atomic
from lora_dist.checkpoint import load_state, save_state
from lora_dist.config import Config, ParallelConfig, TrainConfig
from lora_dist.errors import ConfigError
from lora_dist.launch import init_distributed, run_device
from lora_dist.lora import LoRAConfig
from lora_dist.loss import n_targets, token_loss_sum
from lora_dist.parallel import Engine
from lora_dist.ranks import RankGroup
from lora_dist.session import prepare, run_config
from lora_dist.train import all_sum

__all__ = ["LoraDistMixin", "LoraDistTrainer", "STATE_DIR"]

#: Where a Trainer checkpoint keeps lora_dist's training state (``checkpoint-N/lora_dist``).
STATE_DIR = "lora_dist"
_SCHEDULER = "scheduler.json"


def _check_args(args) -> None:
    """Refuse, in one line, TrainingArguments that would make Trainer wrap, shard or scale the model itself."""
    fix = "lora_dist shards and reduces the model: drop it and pass strategy=... (and parallel=ParallelConfig(...))"
    if args.deepspeed:
        raise ConfigError(f"TrainingArguments(deepspeed=...) conflicts with LoraDistTrainer; {fix}")
    if args.fsdp:
        raise ConfigError(f"TrainingArguments(fsdp=...) conflicts with LoraDistTrainer; {fix}")
    if getattr(args, "torch_compile", False):
        raise ConfigError("TrainingArguments(torch_compile=True) conflicts with LoraDistTrainer (it would compile the "
                          "whole wrapped model); drop it and pass parallel=ParallelConfig(compile=True), which "
                          "compiles each transformer block in place")
    if args.fp16 or args.bf16:
        raise ConfigError("TrainingArguments(fp16/bf16=True) conflicts with LoraDistTrainer (LoRA trains in fp32); "
                          "pass bf16=False, fp16=False (SFTConfig turns bf16 on by default) and compute the base in "
                          "bf16 with parallel=ParallelConfig(mixed_precision='bfloat16')")
    # transformers >= 5.23 names it activation_checkpointing, and the Trainer reads only that name;
    # gradient_checkpointing is its deprecated alias, copied from it once, when the args are made.
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(args, "gradient_checkpointing", None)
    if checkpointing:
        raise ConfigError("TrainingArguments(activation_checkpointing=True) conflicts with LoraDistTrainer; pass "
                          "activation_checkpointing=False (SFTConfig turns it on by default; its old name "
                          "gradient_checkpointing is deprecated) and "
                          "parallel=ParallelConfig(activation_checkpointing=True)")
    if getattr(args, "bf16_full_eval", False) or getattr(args, "fp16_full_eval", False):
        raise ConfigError("TrainingArguments(bf16_full_eval/fp16_full_eval=True) conflicts with LoraDistTrainer (the "
                          "Trainer would cast the model, its fp32 LoRA too, for good); drop it and compute the base "
                          "in bf16 with parallel=ParallelConfig(mixed_precision='bfloat16')")
    if getattr(args, "load_best_model_at_end", False):
        raise ConfigError("TrainingArguments(load_best_model_at_end=True) is not supported by LoraDistTrainer (the "
                          "Trainer would look for a pickled pytorch_model.bin after the whole run); drop it and "
                          "resume the best checkpoint's lora_dist/ state with load_state, or export its adapter")
    if getattr(args, "label_smoothing_factor", 0):
        raise ConfigError("TrainingArguments(label_smoothing_factor=...) is not applied by LoraDistTrainer (the "
                          "engine's loss is the plain token-mean cross-entropy); drop it")
    if getattr(args, "activation_offloading", False):
        raise ConfigError("SFTConfig(activation_offloading=True) is not applied by LoraDistTrainer (lora_dist runs "
                          "the training step); drop it and pass parallel=ParallelConfig(offload_activations=True)")
    optim = str(getattr(args.optim, "value", args.optim))
    adam = (args.adam_beta1, args.adam_beta2, args.adam_epsilon)
    if getattr(args, "optim_args", None):
        raise ConfigError(f"TrainingArguments(optim_args={args.optim_args!r}) is not applied by LoraDistTrainer (it "
                          "trains with torch's AdamW as is); drop it")
    if optim not in ("adamw_torch", "adamw_torch_fused") or adam != (0.9, 0.999, 1e-8):  # not the 4/8-bit ones
        raise ConfigError(f"LoraDistTrainer trains with AdamW(betas=(0.9, 0.999), eps=1e-8), not optim={optim} "
                          f"betas=({args.adam_beta1}, {args.adam_beta2}) eps={args.adam_epsilon}; drop those arguments")


def _move_adapter_files(staged: Path, out: Path) -> None:
    """Move a complete adapter dir's files into ``out`` (a Trainer's output dir, which holds other files too).

    Two files cannot be swapped in at once, so the order keeps every moment loadable or refused: the old
    ``adapter_config.json`` goes first, then the new weights, then the new config. A kill in between leaves
    weights without a config, which PEFT and lora_dist refuse to load, never a config next to weights it does
    not describe (another rank or alpha would load silently).
    """
    (out / ADAPTER_CONFIG).unlink(missing_ok=True)
    fsync(out)  # the removal is durable before anything new arrives
    for f in sorted(staged.iterdir(), key=lambda f: f.name == ADAPTER_CONFIG):  # the config last
        os.replace(f, out / f.name)
        fsync(out)
    staged.rmdir()


def _match_devices(args, device: torch.device) -> None:
    """Refuse TrainingArguments that see other processes or another device than lora_dist runs on.

    accelerate reads the launch when TrainingArguments are made: under srun or mpirun it finds the processes
    only in the variables :func:`~lora_dist.launch.init_distributed` exports (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), and on a CPU-only machine only with ``use_cpu=True``.

    Raises:
        ConfigError: one line naming both and the fix.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.world_size != world or args.device.type != device.type:
        cpu = ", with use_cpu=True" if device.type == "cpu" else ", without use_cpu"
        raise ConfigError(f"TrainingArguments see {args.world_size} process(es) on {args.device.type}, lora_dist "
                          f"{world} on {device.type}; make them after lora_dist.init_distributed(){cpu}")


def _run_config_for(model: str | os.PathLike | Config, args, lora: LoRAConfig | None, strategy: str | None,
                   parallel: ParallelConfig | None, dtype: str | None) -> Config:
    """The lora_dist run config of a Trainer: the optimizer and batch settings come from ``args``."""
    base = run_config(model, lora, strategy, parallel=parallel, dtype=dtype)
    train = TrainConfig(**{**vars(base.train), "lr": args.learning_rate, "weight_decay": args.weight_decay,
                           "max_grad_norm": args.max_grad_norm, "micro_batch_size": args.per_device_train_batch_size,
                           "grad_accum": args.gradient_accumulation_steps, "seed": args.seed})
    return run_config(base, train=train)


class _EngineModel(nn.Module):
    """What Trainer sees as its wrapped model: the engine's forward. Trainer prepares nothing through it."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.module = engine.module
        self._engine = engine

    def forward(self, *args, **kwargs):
        return self._engine.model(*args, **kwargs)


class _EngineStep(torch.optim.Optimizer):
    """Trainer's optimizer: its scheduler sets ``lr`` here, :meth:`step` is ``engine.step(lr)``."""

    def __init__(self, engine: Engine, lr: float) -> None:
        super().__init__([torch.zeros(0, requires_grad=True)], {"lr": lr})
        self.engine = engine
        #: The pre-clip global grad norm of the last step (Trainer logs it).
        self.grad_norm = torch.zeros((), dtype=torch.float64)

    def step(self, closure=None):
        self.grad_norm.fill_(self.engine.step(self.param_groups[0]["lr"]))

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # the engine clears the LoRA gradients after each step


class LoraDistMixin:
    """Put before a ``transformers.Trainer`` subclass: ``class MySFT(LoraDistMixin, SFTTrainer)``.

    Args:
        model: a local HF model dir, or a lora_dist :class:`~lora_dist.config.Config` (its model, lora, parallel).
        args: ``TrainingArguments``; lr, weight decay, clipping, batch sizes, accumulation and seed drive lora_dist.
        lora: what to adapt. strategy: ``fsdp2``, ``zero3``, ``zero1``, ``zero2``, ``ddp`` or ``none``.
        parallel: the strategy's options. dtype: the base model's dtype.
        **kwargs: the Trainer's own (datasets, collator, processing_class, callbacks...).

    Raises:
        ConfigError: TrainingArguments that conflict (deepspeed, fsdp, fp16/bf16, activation_checkpointing, another
            optimizer), or ``optimizers=``/``model_init=`` (lora_dist makes the model and its optimizer).
    """

    def __init__(self, model: str | os.PathLike | Config, args=None, *, lora: LoRAConfig | None = None,
                 strategy: str | None = None, parallel: ParallelConfig | None = None, dtype: str | None = None,
                 **kwargs: Any) -> None:
        from accelerate.utils import parse_flag_from_env
        from transformers import TrainingArguments

        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        _check_args(args)
        for name in ("optimizers", "model_init", "optimizer_cls_and_kwargs"):
            if kwargs.get(name) not in (None, (None, None)):
                raise ConfigError(f"LoraDistTrainer makes the model and its optimizer; drop {name}=")
        if kwargs.get("peft_config") is not None:  # TRL would wrap lora_dist's model with PEFT's own adapters
            raise ConfigError("LoraDistTrainer injects the LoRA itself; drop peft_config= (TRL would add PEFT's "
                              "adapters, which nothing steps, and freeze lora_dist's) and pass lora=LoRAConfig(...)")
        if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or parse_flag_from_env("ACCELERATE_USE_FSDP"):
            raise ConfigError("accelerate's config asks for DeepSpeed/FSDP, which would shard lora_dist's model again; "
                              "launch without that config (accelerate launch --multi_gpu, or torchrun) and pick "
                              "strategy=... instead")
        self.lora_dist_config = _run_config_for(model, args, lora, strategy, parallel, dtype)
        env = init_distributed(self.lora_dist_config.parallel.timeout_s, allow_batch_shell=False)
        _match_devices(args, run_device())
        lora_model, self.engine = prepare(self.lora_dist_config, env=env)
        super().__init__(model=lora_model, args=args, **kwargs)

    # ------------------------------------------------------------------ no second wrapping

    def _move_model_to_device(self, model, device) -> None:
        pass  # placed by lora_dist (sharded params must not be moved)

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        return _EngineModel(self.engine)  # never `self.model`: Trainer then asks accelerate to prepare nothing

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self._engine_step = _EngineStep(self.engine, self.args.learning_rate)
            self.optimizer = self._engine_step
        return self.optimizer

    # ------------------------------------------------------------------ the step

    def get_train_dataloader(self):
        """Trainer's, refused under ``zero*`` where an epoch does not end on an optimizer step: Trainer's last step of
        each epoch then has fewer micro-batches, and DeepSpeed, which counts micro-steps, would skip its update and
        add its gradients into the next one's (``dataloader_drop_last`` and ``max_steps`` change nothing there)."""
        loader = super().get_train_dataloader()
        accumulate = self.args.gradient_accumulation_steps
        if self.lora_dist_config.parallel.strategy.startswith("zero") and accumulate > 1:
            try:
                n = len(loader)
            except TypeError:  # an iterable dataset: its length is not known
                return loader
            if n % accumulate:
                raise ConfigError(
                    f"under {self.lora_dist_config.parallel.strategy} an epoch's {n} micro-batches per rank must be a "
                    f"multiple of gradient_accumulation_steps={accumulate} (DeepSpeed would skip the update of each "
                    "epoch's last, shorter step); change the batch size, the accumulation or the dataset's size, "
                    "or use strategy='fsdp2'")
        return loader

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's micro-batches of one optimizer step, and their target tokens on all ranks."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if any("labels" not in b for b in batches):
            raise ConfigError("LoraDistTrainer needs labels in every batch (a causal-LM collator, or a dataset with "
                              "a labels column)")
        local = float(sum(n_targets(b["labels"]) for b in batches))
        self._step_tokens = all_sum(torch.tensor(local, dtype=torch.float64, device=self.engine.device))
        return batches, self._step_tokens

    def _forward_loss_sum(self, inputs: dict) -> tuple[torch.Tensor, Any]:
        outputs = self.engine.model(**{"use_cache": False, **{k: v for k, v in inputs.items() if k != "labels"}})
        return token_loss_sum(outputs.logits, inputs["labels"].long()), outputs

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: the global token-mean loss, ``engine.backward``; synced on the step's last only."""
        self.engine.model.train()
        inputs = self._prepare_inputs(inputs)
        last = self.accelerator.sync_gradients  # Trainer sets it for the step's last micro-batch
        n_tokens = self._step_tokens.clamp(min=1)
        with contextlib.nullcontext() if last else self.engine.no_sync():
            # the engine's forward + loss: through the chunked head, the full fp32 logits never exist
            loss_sum = self.engine.forward_loss_sum({k: v for k, v in inputs.items() if k != "labels"},
                                                    inputs["labels"].long())
            loss = loss_sum / n_tokens.to(loss_sum.dtype)
            self.engine.backward(loss)
        # Trainer logs the mean over ranks of what this returns: each rank's share of the global mean, times W.
        return loss.detach() * self.accelerator.num_processes

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The evaluation loss (training goes through :meth:`training_step`), as Trainer means it.

        With ``num_items_in_batch`` (the eval step's target tokens on all ranks, which Trainer counts for models
        taking loss kwargs) this rank's share of the global token mean, times the world size, so Trainer's mean
        over ranks is the global token mean; else the batch's own token mean.
        """
        loss_sum, outputs = self._forward_loss_sum(inputs)
        if num_items_in_batch is None:
            loss = loss_sum / max(1, n_targets(inputs["labels"]))
        else:
            ranks = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = loss_sum / torch.as_tensor(num_items_in_batch).clamp(min=1) * ranks
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        return None  # engine.step clips to max_grad_norm after the LoRA all-reduce

    def _get_grad_norm(self, model, grad_norm=None):
        return self._engine_step.grad_norm  # filled by the step that follows, read when Trainer logs

    # ------------------------------------------------------------------ outputs and checkpoints

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write a PEFT-format adapter into ``output_dir`` from any strategy (every rank calls it; rank 0 writes).

        The adapter's two files are added to (or replace theirs in) ``output_dir``; nothing else there changes.
        """
        out = Path(output_dir or self.args.output_dir)
        staged = out / ".lora_dist-adapter"
        self.engine.save_adapter(staged)

        def publish() -> None:
            _move_adapter_files(staged, out)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(out))

        RankGroup().on_rank0(publish)

    def export_merged(self, output_dir: str | os.PathLike, *, dtype: str = "bfloat16", max_shard_size: str = "5GB",
                      overwrite: bool = False) -> Path:
        """End training and write the merged checkpoint from the shards (every rank calls it)."""
        return self.engine.export_merged(output_dir, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """lora_dist's training state (safetensors) and the scheduler (JSON) instead of pickled state dicts."""
        step = self.state.global_step
        samples = step * self.args.gradient_accumulation_steps * self.args.per_device_train_batch_size * \
            self.args.world_size
        save_state(Path(output_dir) / STATE_DIR, step, self.engine, self.lora_dist_config, samples)

        def write_scheduler() -> None:
            write_text_atomic(Path(output_dir) / _SCHEDULER, json.dumps(self.lr_scheduler.state_dict()) + "\n")

        RankGroup().on_rank0(write_scheduler)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore lora_dist's state from a Trainer checkpoint (``checkpoint-N/lora_dist``).

        Raises:
            ConfigError: a ``lora-dist train`` checkpoint (no ``trainer_state.json``: Trainer cannot resume it).
            ResumeError: as :func:`lora_dist.checkpoint.load_state` (another base, other LoRA settings...).
        """
        path = Path(resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(
                f"{path} has no trainer_state.json (Trainer's step, epoch and log history), so Trainer cannot resume "
                "it; continue a lora-dist train checkpoint with `lora-dist train checkpoint.resume=DIR`, or start "
                "a Trainer run from its weights with lora_dist.checkpoint.load_state(DIR, trainer.engine, "
                "trainer.lora_dist_config) before trainer.train()")
        if not (path / STATE_DIR).is_dir():
            raise ConfigError(
                f"{path} holds no {STATE_DIR}/ (LoRA, AdamW moments and step), as a checkpoint of "
                "TrainingArguments(save_only_model=True) does, so it cannot be resumed; drop save_only_model to write "
                "resumable checkpoints, or start a new run from its adapter (lora_dist.load_adapter)")
        load_state(path / STATE_DIR, self.engine, self.lora_dist_config)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The AdamW moments came with :meth:`_load_from_checkpoint`; the scheduler from ``scheduler.json``."""
        if checkpoint is None:
            return
        scheduler = Path(checkpoint) / _SCHEDULER
        if scheduler.is_file():
            self.lr_scheduler.load_state_dict(json.loads(scheduler.read_text()))
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr  # where a pickled optimizer state would have put it


class LoraDistTrainer(LoraDistMixin, Trainer):
    """``transformers.Trainer`` on lora_dist: ``LoraDistTrainer(model=DIR, lora=LoRAConfig(...), strategy="fsdp2",
    args=TrainingArguments(...), train_dataset=...)`` (see :class:`LoraDistMixin`)."""
