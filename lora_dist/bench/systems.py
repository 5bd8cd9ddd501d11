"""The configurations compared, each built the way its users build it.

* ``lora_dist`` (fsdp2, zero3, ddp): :func:`lora_dist.session.build`, as ``lora-dist train`` builds
  the model, its AdamW and the engine, and the training loop's own step
  (``lora_dist.train.forward_backward`` then ``engine.step``).
* ``peft_accelerate_fsdp2``: ``from_pretrained`` -> PEFT ``get_peft_model`` ->
  ``Accelerator(fsdp_plugin=FSDP2, transformer-based wrap)`` ->
  ``accelerator.prepare(model, optimizer)`` and the usual accelerate loop.
* ``peft_accelerate_zero3``: the same with ``DeepSpeedPlugin(zero_stage=3,
  zero3_init_flag=True)``; the model is built under ``deepspeed.zero.Init``.
* ``full_ft_fsdp2``: full fine-tuning, accelerate FSDP2 as above without PEFT.
* bf16 base: ``lora_dist_fsdp2_bf16`` (``model.dtype=bfloat16``), ``lora_dist_nf4`` (its blocks' linears
  NF4, ``model.quantize=nf4``), ``lora_dist_nf4_all`` (the embedding and head NF4 too,
  ``model.quantize_embeddings=true``; like the anchor, without activation checkpointing) against
  ``peft_accelerate_fsdp2_bf16``, the anchor as its users run it
  in bf16: ``from_pretrained(dtype=bfloat16)``, PEFT's adapters in fp32 (its default), accelerate
  ``mixed_precision="bf16"`` (FSDP2 ``MixedPrecisionPolicy`` in bf16).
* ``lora_dist_auto``: ``parallel.strategy=auto``, the planner's choice for the launch; ``lora_dist_auto_bf16``
  the same with a bf16 base (against the bf16 anchor). Opt-in with ``--configs``: ``lora_dist_auto_compile`` and
  ``lora_dist_auto_bf16_compile``, the same with ``parallel.compile=true``.

Accelerate only enables FSDP on accelerator devices: on a CPU-only machine
``Accelerator(fsdp_plugin=...)`` silently falls back to DDP (``cpu=True``) or
to no distribution at all. There the FSDP configurations set the accelerator
state to FSDP exactly as accelerate's accelerator branch does
(``distributed_type = FSDP``, ``fsdp_plugin = plugin``) right after
``Accelerator(cpu=True, fsdp_plugin=plugin)``; everything after that -
``prepare`` -> ``fsdp2_prepare_model`` with accelerate's wrap policy, the
``cpu_ram_efficient_loading`` broadcast from rank 0, optimizer re-mapping,
``backward``, ``clip_grad_norm_``, ``get_state_dict`` - is accelerate's own
code. The result records ``reproduced=True`` for such runs. DeepSpeed ZeRO-3
runs through accelerate's public API on CPU once the process-group backend
is named (``InitProcessGroupKwargs(backend="gloo")``): without it accelerate
counts one process per rank and DeepSpeed rejects the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SYSTEMS", "BenchSettings", "System", "make_system"]

LR = 1e-4


@dataclass
class BenchSettings:
    """What every configuration shares."""

    model_path: str
    data_path: str
    seq_len: int = 256
    micro_batch: int = 1
    lora_r: int = 16
    lora_alpha: float = 32.0
    seed: int = 0


class System:
    """One configuration: set up, then train steps, forward passes and (optionally) a merged export."""

    name = ""
    description = ""
    reproduced = False
    can_export = False
    counts_tensors = True  # the worker counts live tensor bytes on a CPU (LiveTensorBytes)

    def __init__(self, settings: BenchSettings, device: torch.device) -> None:
        self.s = settings
        self.device = device
        self.notes: list[str] = []

    def setup(self) -> None:
        raise NotImplementedError

    def prepare(self, ids: torch.Tensor, labels: torch.Tensor) -> Any:
        """A micro-batch's host tensors as this system's own loop hands them to a step: on the device. Not timed."""
        return ids.to(self.device), labels.to(self.device)

    def train_step(self, batch: Any) -> None:
        """One optimizer step on a micro-batch from :meth:`prepare`."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, batch: Any) -> None:
        raise NotImplementedError

    def export(self, out_dir: Path) -> None:
        raise NotImplementedError

    def save_adapter(self, out_dir: Path) -> None:
        raise NotImplementedError

    def param_counts(self) -> dict:
        raise NotImplementedError

    def base_bytes(self) -> int:
        """Bytes of the frozen base this rank holds after setup (its shards; NF4 bytes where quantized)."""
        from lora_dist.bench.measure import held_bytes

        return sum(held_bytes(p) for p in self.model.parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------- lora_dist

#: lora_dist configurations beyond one per strategy: (strategy, overrides).
VARIANTS = {
    "lora_dist_fsdp2_bf16": ("fsdp2", ("model.dtype=bfloat16",)),
    "lora_dist_auto_bf16": ("auto", ("model.dtype=bfloat16",)),
    "lora_dist_nf4": ("fsdp2", ("model.dtype=bfloat16", "model.quantize=nf4")),
    # The embedding and head in NF4 too; no activation checkpointing, as the anchor runs: like for like.
    "lora_dist_nf4_all": ("fsdp2", ("model.dtype=bfloat16", "model.quantize=nf4", "model.quantize_embeddings=true")),
    # Opt-in (--configs): auto with each block compiled (on a CPU their live tensors are not counted: LoraDist.setup).
    "lora_dist_auto_compile": ("auto", ("parallel.compile=true",)),
    "lora_dist_auto_bf16_compile": ("auto", ("model.dtype=bfloat16", "parallel.compile=true")),
}


class LoraDist(System):
    can_export = True

    def __init__(self, settings: BenchSettings, device: torch.device, strategy: str,
                 overrides: tuple[str, ...] = (), name: str = "") -> None:
        super().__init__(settings, device)
        self.strategy = strategy
        self.overrides = overrides  # more config overrides (parallel.dp_replicate=2 ...)
        self.name = name or f"lora_dist_{strategy}"
        self.description = " ".join((f"lora_dist parallel.strategy={strategy}", *overrides))
        self.can_export = strategy in ("fsdp2", "zero3")

    def setup(self) -> None:
        from lora_dist.config import load_config
        from lora_dist.launch import detect_launch_env
        from lora_dist.session import build, check_launch, open_base, resolve_launch, strategy_config

        s = self.s
        cfg = load_config(None, [
            f"model.path={s.model_path}", f"parallel.strategy={self.strategy}", f"lora.r={s.lora_r}",
            f"lora.alpha={s.lora_alpha}", "lora.target_modules=all-linear", f"train.micro_batch_size={s.micro_batch}",
            f"train.seq_len={s.seq_len}", f"train.lr={LR}", "train.max_grad_norm=1.0", f"train.seed={s.seed}",
            "train.weight_decay=0", *self.overrides,
        ])
        # What `lora-dist train` builds for this launch (strategy auto, fsdp2's mesh, reshard to a node): its
        # own session.build, AdamW over the LoRA params included.
        self.env = env = detect_launch_env()
        check_launch(cfg, env)
        base = open_base(cfg, env)
        # auto and fsdp2's mesh resolved once, before the build: the notes and plan() then describe what ran.
        # Resolved again once the model is loaded, a GPU's free memory (the budget) is smaller, and the planner
        # could name another strategy, or none.
        self.cfg = cfg = resolve_launch(cfg, env, self.device)
        self.model, self.engine = build(cfg, env, self.device, base, strategy_config(cfg, base))
        if self.strategy == "auto":
            from lora_dist.plan import mode_name

            self.notes.append(f"auto chose {mode_name(cfg.parallel)}")
        if cfg.parallel.compile and self.device.type == "cpu":
            # The counting TorchDispatchMode makes a compiled graph run op by op (the eager peak without selective
            # recompute) and counts what the compiled artifacts hold besides: not the compiled step's bytes.
            self.counts_tensors = False
            self.notes.append("compiled blocks: live tensors not counted on a CPU (the counting dispatch mode runs "
                              "compiled graphs op by op); RSS measured")
        if self.strategy == "fsdp2" and cfg.parallel.strategy != "fsdp2":
            self.notes.append(f"fsdp2 over one shard rank ran as {cfg.parallel.strategy}")

    def plan(self) -> dict:
        """:func:`lora_dist.plan.plan_memory` of the configuration :meth:`setup` built (auto and fsdp2's mesh
        resolved), as a dict."""
        from lora_dist.plan import plan_memory

        return plan_memory(self.cfg, self.env.world_size).as_dict()

    def prepare(self, ids, labels) -> dict:
        """As ``lora-dist train`` builds a micro-batch (:func:`lora_dist.data.batch_inputs`): what the loss needs is
        found on the host. Each row is one sequence, as the anchors take it."""
        from lora_dist.data import batch_inputs

        return batch_inputs(ids, labels, torch.arange(ids.shape[1]).expand_as(ids), self.device)

    def train_step(self, batch) -> None:
        from lora_dist.train import forward_backward

        forward_backward(self.engine, [batch])
        self.engine.step(LR)

    @torch.no_grad()
    def forward(self, batch) -> None:
        from lora_dist.loss import token_loss_sum

        # No KV cache, as the training forward runs (lora_dist.data's inputs): the anchors' forward is their own.
        token_loss_sum(self.engine.model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])

    def export(self, out_dir: Path) -> None:
        """As at the end of ``lora-dist train``: training state freed, then the merged export."""
        from lora_dist.export import export_merged

        self.engine.finish_training()
        export_merged(self.engine.module, out_dir, self.s.model_path, dtype=torch.float32, max_shard_size="5GB",
                      overwrite=True)

    def save_adapter(self, out_dir: Path) -> None:
        from lora_dist.adapter import save_adapter

        with self.engine.gathered_lora():
            if dist.get_rank() == 0:
                save_adapter(self.model, out_dir, self.s.model_path)

    def param_counts(self) -> dict:
        from lora_dist.lora import lora_parameters

        lora = lora_parameters(self.model)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        return {"trainable": sum(getattr(p, "ds_numel", p.numel()) for p in lora), "total": total}


# ----------------------------------------------------------------------------- accelerate anchors


def _peft_config(s: BenchSettings):
    from peft import LoraConfig

    # "all-linear" in PEFT adapts every linear layer but the output head, as lora_dist's does.
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


class AccelerateSystem(System):
    """The usual accelerate loop: forward with labels, ``accelerator.backward``, clip, step, zero_grad."""

    peft = True
    bf16 = False  # the base loaded in bf16 (the bf16 anchor)

    def _make_model(self):
        from transformers import AutoModelForCausalLM

        # The bf16 anchor loads the base in bf16, as its users do; PEFT keeps its adapters in fp32 (its default).
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.s.model_path, dtype=dtype, use_safetensors=True)
        if self.peft:
            from peft import get_peft_model

            model = get_peft_model(model, _peft_config(self.s))
        model.train()
        return model

    def train_step(self, batch) -> None:
        ids, labels = batch
        loss = self.model(input_ids=ids, labels=labels).loss
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward(self, batch) -> None:
        ids, labels = batch
        self.model(input_ids=ids, labels=labels)

    def param_counts(self) -> dict:
        params = list(self.model.parameters())
        numel = [getattr(p, "ds_numel", None) or (p.numel()) for p in params]
        return {"trainable": sum(n for p, n in zip(params, numel) if p.requires_grad), "total": sum(numel)}


class AccelerateFSDP2(AccelerateSystem):
    can_export = True

    def __init__(self, settings: BenchSettings, device: torch.device, peft: bool, bf16: bool = False) -> None:
        super().__init__(settings, device)
        self.peft, self.bf16 = peft, bf16
        self.name = ("peft_accelerate_fsdp2" if peft else "full_ft_fsdp2") + ("_bf16" if bf16 else "")
        self.description = ("PEFT get_peft_model + accelerate FSDP2" if peft
                            else "full fine-tuning, accelerate FSDP2")
        if bf16:
            self.description += ", bf16 base (from_pretrained dtype=bfloat16, mixed_precision=bf16)"
        self.can_export = peft and not bf16

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        # PEFT's documented FSDP recipe, as FSDP2: wrap each decoder layer, reshard after forward,
        # only rank 0 reads the checkpoint (cpu_ram_efficient_loading) and broadcasts shards.
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            cpu_ram_efficient_loading=True, state_dict_type="SHARDED_STATE_DICT",
        )
        precision = "bf16" if self.bf16 else "no"
        self.accelerator = Accelerator(cpu=self.device.type == "cpu", fsdp_plugin=plugin, mixed_precision=precision)
        if not self.accelerator.is_fsdp2:
            # Accelerate gates FSDP to accelerator devices (AcceleratorState.__init__); set the state
            # exactly as its accelerator branch does, then let accelerate's own FSDP2 code run.
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            if precision != "no":
                plugin.set_mixed_precision(precision)
            state.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.reproduced = True
            self.notes.append("accelerate enables FSDP only on accelerator devices; on CPU its FSDP state was set "
                              "as its GPU branch sets it, then accelerate's own prepare/fsdp2_prepare_model ran")
        model = self._make_model()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def export(self, out_dir: Path) -> None:
        """Full state dict gathered to rank 0, PEFT ``merge_and_unload``, ``save_pretrained``."""
        from accelerate import init_empty_weights
        from peft import get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        state = self.accelerator.get_state_dict(self.model)  # whole on rank 0, offloaded to CPU
        if self.accelerator.is_main_process:
            config = AutoConfig.from_pretrained(self.s.model_path)
            with init_empty_weights(include_buffers=False):
                skeleton = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                                          _peft_config(self.s))
            skeleton.load_state_dict(state, strict=True, assign=True)  # no second copy of the weights
            del state
            merged = skeleton.merge_and_unload()
            merged.save_pretrained(out_dir, max_shard_size="5GB")
            del merged, skeleton
        self.accelerator.wait_for_everyone()


class AccelerateZero3(AccelerateSystem):
    name = "peft_accelerate_zero3"
    description = "PEFT get_peft_model + accelerate DeepSpeed ZeRO-3"

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        plugin = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1, gradient_clipping=1.0,
                                 zero3_init_flag=True, offload_optimizer_device="none", offload_param_device="none")
        handlers = []
        if self.device.type == "cpu":
            # Without a backend accelerate's CPU path counts one process (rank 0 of 1 on every rank)
            # and DeepSpeed rejects the batch size; naming gloo is accelerate's own switch for it.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
            self.notes.append("accelerate on CPU needs InitProcessGroupKwargs(backend='gloo') for DeepSpeed "
                              "to see 2 processes; otherwise unchanged")
        self.accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)
        # No dataloader goes through prepare(), so accelerate asks for the micro-batch size.
        self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.s.micro_batch
        model = self._make_model()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)


SYSTEMS = ("lora_dist_fsdp2", "lora_dist_zero3", "lora_dist_ddp", "lora_dist_auto", *VARIANTS,
           "peft_accelerate_fsdp2", "peft_accelerate_fsdp2_bf16", "peft_accelerate_zero3", "full_ft_fsdp2")


def make_system(name: str, settings: BenchSettings, device: torch.device) -> System:
    if name in VARIANTS:
        strategy, overrides = VARIANTS[name]
        system = LoraDist(settings, device, strategy, overrides, name)
        system.can_export = False  # the merged export is measured on the fp32 configurations
        return system
    if name.startswith("lora_dist_"):
        return LoraDist(settings, device, name[len("lora_dist_"):])
    if name == "peft_accelerate_fsdp2":
        return AccelerateFSDP2(settings, device, peft=True)
    if name == "peft_accelerate_fsdp2_bf16":
        return AccelerateFSDP2(settings, device, peft=True, bf16=True)
    if name == "full_ft_fsdp2":
        return AccelerateFSDP2(settings, device, peft=False)
    if name == "peft_accelerate_zero3":
        return AccelerateZero3(settings, device)
    raise ValueError(f"unknown configuration {name!r}; choose from {SYSTEMS}")
