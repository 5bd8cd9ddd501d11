"""DeepSpeed ZeRO: the config, the model construction context and the engine. DeepSpeed internals live here only.

ZeRO-3 shards at construction: the model is built under :func:`zero_init` and
each rank then reads its flat partition (:mod:`lora_dist.sharding`).
LoRA tensors are kept whole on every rank ("persistent") by a persistence
threshold just above the largest LoRA matrix. The LoRA promise holds in bf16
too: gradients are reduced in fp32 (``communication_data_type``), and the
engine reads and writes LoRA through DeepSpeed's fp32 master copies, so an
adapter or a checkpoint never carries bf16-rounded values. DeepSpeed stores the
reduced gradients in its gradient-accumulation dtype, the model's (bf16 under its
bf16; lora_dist sets no ``grad_accum_dtype``, which would switch ZeRO-1 to another
optimizer): AdamW steps on fp32 sums rounded once to bf16. Under zero1/2 the LoRA
params themselves are bf16 copies of the masters (DeepSpeed casts the whole module).

DeepSpeed's collectives call torch's ``all_gather_into_tensor`` and ``reduce_scatter_tensor``, which torch 2.13
deprecates with a FutureWarning, printed again and again (4 per rank and step of a zero3 run, measured): thousands
of log lines a run about code the user cannot change. :func:`quiet_deepspeed_collectives` silences exactly those two
messages whenever DeepSpeed runs (:func:`zero_init`, :class:`DeepSpeedEngine`); lora_dist's own collectives use
the new names (:mod:`lora_dist.collectives`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Mapping

import torch
import torch.distributed as dist

from lora_dist.config import Config, read_deepspeed_config
from lora_dist.errors import ConfigError
from lora_dist.inputs import excerpt
from lora_dist.model_dir import text_config
from lora_dist.parallel.engine import MOMENTS, Engine
from lora_dist.releases import release

__all__ = [
    "ACTIVATION_CHECKPOINTING_MIN",
    "DeepSpeedEngine",
    "cap_reduce_bucket",
    "check_supported",
    "deepspeed_config",
    "max_lora_numel",
    "quiet_deepspeed_collectives",
    "skip_cpu_inference_op",
    "zero_init",
]

#: The first DeepSpeed release whose ZeRO-3 keeps frozen params gathered during activation recompute
#: (older ones fail with ``CheckpointError: saved shape [N] vs recomputed [0]``).
ACTIVATION_CHECKPOINTING_MIN = (0, 19, 3)
#: torch's deprecation message for the collectives DeepSpeed calls (``warnings.filterwarnings`` matches its start).
_DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def check_supported(strategy: str, activation_checkpointing: bool | int, version: str | None = None) -> None:
    """Refuse, in one line, what the installed DeepSpeed gets wrong with a frozen base.

    Raises:
        ConfigError: ZeRO-3 with activation checkpointing on DeepSpeed < 0.19.3.
    """
    if strategy != "zero3" or not activation_checkpointing:
        return
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if release(version) < ACTIVATION_CHECKPOINTING_MIN:
        need = ".".join(map(str, ACTIVATION_CHECKPOINTING_MIN))
        raise ConfigError(f"parallel.strategy=zero3 with activation checkpointing (parallel.activation_checkpointing="
                          f"{str(activation_checkpointing).lower()}) needs deepspeed>={need} "
                          f"(older releases drop frozen params during recompute), found {version}; "
                          f"pip install 'deepspeed>={need}' or set parallel.activation_checkpointing=false")


def max_lora_numel(cfg: Config, hf_config) -> int:
    """Elements of the largest LoRA matrix the config can create: r x the largest projection dimension, times
    the number of experts for an adapter on fused experts (``lora.target_parameters``: PEFT's ``(E * r, in)``)."""
    hf_config = text_config(hf_config)
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", 4096)
    inter = getattr(hf_config, "intermediate_size", None) or 4 * hidden
    r = max([cfg.lora.r, *cfg.lora.rank_pattern.values()])
    # The output head is never adapted.
    largest = r * max(hidden, inter)
    if cfg.lora.target_parameters:
        experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 1
        expert_inter = getattr(hf_config, "moe_intermediate_size", None) or inter
        largest = max(largest, r * experts * max(hidden, 2 * expert_inter))
    return largest


def _largest_block_weight(hf_config) -> int:
    hf_config = text_config(hf_config)
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", 4096)
    inter = getattr(hf_config, "intermediate_size", None) or 4 * hidden
    return hidden * inter


def _bf16(cfg: Config) -> bool:
    """Whether DeepSpeed keeps the base in bf16: ``model.dtype`` or ``parallel.mixed_precision`` is bfloat16 (the
    LoRA steps fp32 masters either way)."""
    return "bfloat16" in (cfg.parallel.mixed_precision, cfg.model.dtype)


def _precision(ds: dict, cfg: Config) -> dict:
    """The user's DeepSpeed config ``ds`` with its ``bf16`` section (or the older ``bfloat16``) and ``fp16``
    section set from ``model.dtype``/``parallel.mixed_precision`` where it leaves ``enabled`` out (or ``"auto"``,
    as the HF Trainer's files write it); without that, DeepSpeed builds and computes the base in fp32 whatever
    the config says.

    Raises:
        ConfigError: the file's ``enabled`` contradicts them (bf16 on or off against ours, any fp16 on: lora_dist
            trains no float16), naming both and the fix.
    """
    key = "bfloat16" if "bf16" not in ds and "bfloat16" in ds else "bf16"  # DeepSpeed reads bf16 first
    ours = f"model.dtype={cfg.model.dtype} and parallel.mixed_precision={cfg.parallel.mixed_precision}"
    where = f"parallel.deepspeed_config={excerpt(cfg.parallel.deepspeed_config, 120)}"
    out = dict(ds)
    for section, wanted in ((key, _bf16(cfg)), ("fp16", False)):
        given = out.get(section)
        if given is None and section == "fp16":
            continue  # DeepSpeed's default: off
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise ConfigError(f'{where}: "{section}" is {excerpt(given, 40)}, not an object; write it as '
                              f'"{section}": {{"enabled": {str(wanted).lower()}}} or leave it out')
        enabled = given.get("enabled", "auto")
        if isinstance(enabled, str) and enabled.lower() in ("true", "false"):  # DeepSpeed reads these as booleans
            enabled = enabled.lower() == "true"
        if enabled == "auto":
            out[section] = {**given, "enabled": wanted}
            continue
        if not isinstance(enabled, bool):
            raise ConfigError(f'{where}: "{section}": {{"enabled": {excerpt(enabled, 40)}}} is not true, false or '
                              '"auto"; write one of them (or leave "enabled" out: lora_dist sets it)')
        if enabled == wanted:
            continue
        if section == "fp16":
            raise ConfigError(f'{where} turns on "fp16", but lora_dist trains no float16 (it needs a loss scaler '
                              f"lora_dist does not run) and {ours} ask for "
                              f'{"bfloat16" if _bf16(cfg) else "float32"}; drop the file\'s "fp16" section')
        fix = ("set model.dtype=bfloat16 or parallel.mixed_precision=bfloat16" if enabled else
               "set model.dtype=float32 and parallel.mixed_precision=float32")
        raise ConfigError(f'{where} turns "{section}" {"on" if enabled else "off"}, but {ours} ask for '
                          f'{"bfloat16" if _bf16(cfg) else "float32"}; {fix}, or leave "enabled" out of the '
                          f'file\'s "{section}" section (lora_dist sets it from those)')
    return out


def user_deepspeed_config(cfg: Config) -> dict:
    """The ``parallel.deepspeed_config`` file, read and checked, its precision set from ours (:func:`_precision`).

    Raises:
        ConfigError: the file cannot be read, is of another ZeRO stage, or its bf16/fp16 section contradicts
            ``model.dtype``/``parallel.mixed_precision``.
    """
    return _precision(read_deepspeed_config(cfg.parallel.deepspeed_config, cfg.parallel.strategy), cfg)


def deepspeed_config(cfg: Config, hf_config) -> dict:
    """The DeepSpeed config of a run: generated from ``parallel.*``/``train.*``, or read from
    ``parallel.deepspeed_config`` with the batch and clipping keys set from ours, the strategy's
    ``zero_optimization.stage`` where the file gives none, and bf16 from ``model.dtype``/``parallel.mixed_precision``
    where it leaves that out (one that contradicts them is refused).

    Args:
        cfg: the run config.
        hf_config: the base model's ``transformers`` config (sizes the persistence threshold and buckets).

    Raises:
        ConfigError: the file cannot be read, is of another ZeRO stage, or its bf16/fp16 section contradicts
            ``model.dtype``/``parallel.mixed_precision``.
    """
    p, t = cfg.parallel, cfg.train
    stage = int(p.strategy[-1])
    bucket = int(p.bucket_mb * 1e6 / 4)
    if p.deepspeed_config:
        ds = user_deepspeed_config(cfg)
        # Without a stage DeepSpeed would run stage 0 (no ZeRO): the strategy's.
        ds["zero_optimization"] = {"stage": stage, **ds.get("zero_optimization", {})}
    else:
        ds = {
            "zero_optimization": {
                "stage": stage,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_bucket_size": bucket,
                # LoRA tensors below this size stay whole (persistent) on every rank.
                "stage3_param_persistence_threshold": max_lora_numel(cfg, hf_config) + 1,
                # Release gathered base weights soon (DeepSpeed's default keeps up to 1e9 parameters live, the
                # whole model at small sizes) but keep room for two of the largest block weights, or the
                # prefetch of the next one could never start.
                "stage3_max_live_parameters": max(bucket, 2 * _largest_block_weight(hf_config)),
                "stage3_max_reuse_distance": 0,
                "stage3_prefetch_bucket_size": max(bucket, _largest_block_weight(hf_config)),
            },
            "zero_allow_untested_optimizer": True,
            # A bf16 base (model.dtype) is stored and computed in bf16; the LoRA steps fp32 masters.
            "bf16": {"enabled": _bf16(cfg)},
            # LoRA gradients are reduced in fp32 even when the base computes in bf16.
            "communication_data_type": "fp32",
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["gradient_clipping"] = t.max_grad_norm
    ds.pop("train_batch_size", None)
    return ds


def cap_reduce_bucket(ds_config: dict, trainable_numel: int) -> dict:
    """``ds_config`` with ``reduce_bucket_size`` at most the number of trainable elements.

    DeepSpeed allocates the whole reduce bucket up front (ZeRO-3: for the life of the engine;
    ZeRO-1/2: at each backward); a bucket larger than every gradient together buys nothing (one
    reduction either way) and only holds memory, which at LoRA sizes is most of the bucket.
    """
    zero = ds_config.get("zero_optimization")
    if not isinstance(zero, dict) or trainable_numel <= 0:
        return ds_config
    size = int(float(zero.get("reduce_bucket_size", 5e8)))  # DeepSpeed accepts "5e8" as well as ints
    if size <= trainable_numel:
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, "reduce_bucket_size": trainable_numel}}


def quiet_deepspeed_collectives() -> None:
    """Ignore torch's deprecation of the two collectives DeepSpeed's ZeRO calls (process-wide, where DeepSpeed runs;
    calling it again adds no second filter)."""
    warnings.filterwarnings("ignore", message=_DEPRECATED_COLLECTIVES, category=FutureWarning)


def skip_cpu_inference_op() -> None:
    """On DeepSpeed's CPU accelerator, skip building its shared-memory all-reduce (``deepspeed_shm_comm``).

    DeepSpeed compiles that C++ extension at its first communication backend init (about 90 s here, once per
    install and torch build) for ``inference_all_reduce`` alone, which only its tensor-parallel inference layers
    call, never ZeRO training; marked incompatible, DeepSpeed uses torch's all-reduce there instead. Process-wide;
    nothing changes on a GPU, where that accelerator has no such op."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        builder = accelerator.create_op_builder("ShareMemCommBuilder") if accelerator.device_name() == "cpu" else None
    except Exception:  # another DeepSpeed layout: it builds what it builds
        return
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


@contextlib.contextmanager
def zero_init(ds_config: dict):
    """Build modules inside this context to have ZeRO-3 partition each param as it is created."""
    import deepspeed

    quiet_deepspeed_collectives()
    skip_cpu_inference_op()
    # transformers imports modeling_utils (and torch._dynamo with it) lazily; a first import inside zero.Init,
    # which patches tensor creation, fails with "Signature mismatch ... tensor_pynew".
    import transformers.modeling_utils  # noqa: F401

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield


@contextlib.contextmanager
def open_mpi_local_rank_as_exported():
    """Inside this context Open MPI's ``OMPI_COMM_WORLD_LOCAL_RANK`` says what ``LOCAL_RANK`` says.

    ``init_distributed`` exports ``LOCAL_RANK`` as the rank's GPU index, DeepSpeed's device: 0 on every rank where
    each sees one GPU (``mpirun`` with a wrapper setting ``CUDA_VISIBLE_DEVICES`` from the local rank). DeepSpeed's
    engine asserts at init that ``OMPI_COMM_WORLD_LOCAL_RANK``, where set, equals ``LOCAL_RANK`` ("conflicting local
    rank info"), which fails every rank there but a node's first. The variable is restored after."""
    name = "OMPI_COMM_WORLD_LOCAL_RANK"
    own = os.environ.get(name)
    if own is None or "LOCAL_RANK" not in os.environ or own == os.environ["LOCAL_RANK"]:
        yield
        return
    os.environ[name] = os.environ["LOCAL_RANK"]
    try:
        yield
    finally:
        os.environ[name] = own


@contextlib.contextmanager
def broadcast_trainable_only():
    """Inside this context DeepSpeed's engine broadcasts only the trainable params (the LoRA) from rank 0 at init.

    Without ``zero.Init`` (zero1/2) ``deepspeed.initialize`` broadcasts every parameter, tensor by tensor: the whole
    frozen base (16 GB for a bf16 8B, 140 GB for a 70B) at every start and resume, across nodes, though every rank
    loaded the same base from the files (checked across nodes: ``session.check_same_base``). The ddp engine leaves
    the base out of DDP's broadcast the same way. A DeepSpeed without this method broadcasts as it does."""
    from deepspeed.runtime.engine import DeepSpeedEngine as DSEngine

    broadcast = getattr(DSEngine, "_broadcast_model", None)
    if broadcast is None:
        yield
        return

    def broadcast_trainable(engine) -> None:
        module = engine.module
        every, own = module.named_parameters, module.__dict__.get("named_parameters")
        # DeepSpeed's own rule (its groups, its source rank, MoE experts) over the trainable params only.
        module.__dict__["named_parameters"] = lambda *a, **k: ((n, p) for n, p in every(*a, **k) if p.requires_grad)
        try:
            broadcast(engine)
        finally:
            if own is None:
                del module.__dict__["named_parameters"]
            else:  # the model's own override, as it was
                module.__dict__["named_parameters"] = own

    DSEngine._broadcast_model = broadcast_trainable
    try:
        yield
    finally:
        DSEngine._broadcast_model = broadcast


class DeepSpeedEngine(Engine):
    """ZeRO-1/2/3 through ``deepspeed.initialize``; the loss is scaled back from DeepSpeed's averaging."""

    def __init__(self, model, optimizer, ds_config: dict, device: torch.device | None = None) -> None:
        import deepspeed

        quiet_deepspeed_collectives()
        skip_cpu_inference_op()
        super().__init__(model, optimizer, ds_config.get("gradient_clipping", 0.0), device)
        ds_config = cap_reduce_bucket(ds_config, sum(getattr(p, "ds_numel", p.numel()) for p in self.lora_params))
        with broadcast_trainable_only(), open_mpi_local_rank_as_exported():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        # DeepSpeed averages over ranks and divides by the accumulation steps.
        self.loss_multiplier = float(dist.get_world_size() * ds_config["gradient_accumulation_steps"])

    @property
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.loss_multiplier)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def gathered_lora(self, modifier: bool = False):
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.lora_params, modifier_rank=0 if modifier else None)

    def finish_training(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._inner_optimizer.state.clear()
        self.engine.empty_partition_cache()  # ZeRO-3: release the base weights the last forward gathered
        # ZeRO-3 keeps its reduce buckets allocated for the engine's life; no backward follows.
        getattr(self.optimizer, "ipg_buckets", {}).clear()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 masters (DeepSpeed keeps the params themselves in bf16 under bf16 ZeRO-1/2)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = super().lora_state_dict()
        for name, p in self.named_lora_params():
            master = safe_get_full_fp32_param(p)  # collective under ZeRO
            if master is not None:
                out[name] = master.detach().float().to(out[name].device).reshape(out[name].shape).clone()
        return out

    def replica_tensors(self) -> dict[str, torch.Tensor]:
        # Persistent ZeRO-3 params keep a whole copy that forward uses; compare that copy, not a re-gather.
        if all(p.data.numel() == getattr(p, "ds_numel", p.numel()) for p in self.lora_params):
            return {name: p.data.clone() for name, p in self.named_lora_params()}
        return Engine.lora_state_dict(self)

    def optimizer_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_lora_params():
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(p, key)  # moments live in flat partitions
                if value is not None:
                    out[f"{name}.{key}"] = value.detach().float().cpu().clone()
        return out

    @torch.no_grad()
    def _load_lora(self, tensors: Mapping[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        super()._load_lora(tensors)
        # The optimizer steps fp32 master copies of its partitions: set those too.
        for name, p in self.named_lora_params():
            safe_set_full_fp32_param(p, tensors[name].float())

    def _load_moments(self, tensors: Mapping[str, torch.Tensor], step: int) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        zero_opt, inner = self.optimizer, self._inner_optimizer
        # The flat fp32 partitions torch's AdamW steps (ZeRO-3 detaches them from param_groups between steps).
        flat = [p for g in inner.param_groups for p in g["params"]]
        flat += list(getattr(zero_opt, "fp32_partitioned_groups_flat", []))
        flat += list(getattr(zero_opt, "single_partition_of_fp32_groups", []))
        for p in flat:  # AdamW creates its state lazily: create it so it can be filled
            if not inner.state.get(p):
                inner.state[p] = {key: torch.zeros_like(p) for key in MOMENTS}
            inner.state[p]["step"] = torch.tensor(float(step))
        for name, p in self.named_lora_params():
            for key in MOMENTS:
                if f"{name}.{key}" in tensors:
                    safe_set_full_optimizer_state(p, tensors[f"{name}.{key}"], key)
