"""Sharding the frozen base and keeping the LoRA replicas in sync.

``parallelize`` applies, in this order: activation checkpointing -> FSDP2
``fully_shard`` per transformer block, then the root. LoRA params are passed
as ``ignored_params``: they stay plain, whole tensors on every rank and their
gradients are all-reduced by :class:`LoRAGradReducer` in buckets launched from
post-accumulate-grad hooks, overlapping backward. The base becomes ``Shard(0)``
DTensors with no gradients and no optimizer state.

DeepSpeed ZeRO is different only in where sharding happens: the model is
built under ``deepspeed.zero.Init`` (see :mod:`lora_dist.model`) and the
engine is created by :func:`make_engine`.

:func:`make_engine` gives the training loop one interface for every strategy:
``no_sync`` for micro-steps inside gradient accumulation, ``backward`` and
``step``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.config import ParallelConfig, TrainConfig
from lora_dist.lora import lora_modules, lora_parameters

__all__ = [
    "Engine",
    "LoRAGradReducer",
    "ReplicaMismatchError",
    "check_replicas",
    "deepspeed_config",
    "find_blocks",
    "make_engine",
    "parallelize",
]

log = logging.getLogger(__name__)


class ReplicaMismatchError(RuntimeError):
    """LoRA params differ across ranks: the replicas have drifted."""


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (HF's ``_no_split_modules`` classes, else the largest ModuleList)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def _enable_activation_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError("parallel.activation_checkpointing needs a Hugging Face model; set it to false")
    # Non-reentrant checkpointing recomputes each block and keeps parameter names unchanged.
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Apply activation checkpointing, then shard the frozen base (fsdp2), in place.

    Call after :func:`lora_dist.lora.inject_lora` and before materialization:
    the model may live on the meta device. For ``zero*``, ``ddp`` and ``none``
    only activation checkpointing is applied here.

    Raises:
        ValueError: fsdp2 found no transformer block to shard.
    """
    if cfg.activation_checkpointing:
        _enable_activation_checkpointing(model)
    if cfg.strategy != "fsdp2":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cfg.mixed_precision == "bfloat16" else None,
        reduce_dtype=torch.float32,
    )
    # Base shards live in host memory and are copied to the device for each unit's all-gather. On CPU
    # they are there already; the policy still applies (and is tested), without pinned memory.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    ignored = set(lora_parameters(model))
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no transformer blocks to shard; use parallel.strategy=ddp")
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
    for block in blocks:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **shard)
    # Input embedding and output head are often the largest tensors: their own units, so only one
    # of them is gathered at a time. Tied ones share a parameter and must stay in one unit (the root).
    # The head runs last in forward and first in backward: resharding it in between would only
    # gather it again at once.
    embed, head = _embedding_and_head(model)
    for module, reshard in ((embed, cfg.reshard_after_forward), (head, False)):
        if module is not None:
            fully_shard(module, reshard_after_forward=reshard, **shard)
    # The root keeps what is left (final norm); backward needs it first, so no reshard after forward.
    fully_shard(model, reshard_after_forward=False, **shard)
    return model


def _embedding_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The input embedding and output head, each ``None`` where absent, tied or parameterless."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embed is not None and head is not None and embed.weight is head.weight:
        return None, None
    own = lambda m: m if isinstance(m, nn.Module) and any(True for _ in m.parameters()) else None  # noqa: E731
    return own(embed), own(head)


class LoRAGradReducer:
    """Bucketed all-reduce (sum) of replicated LoRA gradients, overlapped with backward.

    Buckets are filled in reverse registration order (roughly the order
    backward produces gradients) and launched strictly in bucket order so every
    rank issues the same collectives in the same sequence. While
    :meth:`no_sync` is active nothing is communicated: gradients accumulate
    locally and are reduced once, at the accumulation boundary.

    Args:
        params: the LoRA params (identical on every rank).
        bucket_mb: bucket size in MB.
        group: process group (default: world).
    """

    def __init__(self, params: list[nn.Parameter], bucket_mb: float = 25.0, group=None) -> None:
        self.group = group
        self.buckets: list[list[nn.Parameter]] = []
        limit, size = bucket_mb * 1e6, 0.0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if not self.buckets or size + nbytes > limit:
                self.buckets.append([])
                size = 0.0
            self.buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._sync = True
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _reset(self) -> None:
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._works: list[tuple[object, torch.Tensor, list[nn.Parameter]]] = []
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._sync:
            return
        b = self._bucket_of[id(param)]
        self._ready[b].add(id(param))
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        params = self.buckets[b]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        for p in params:
            p.grad = None  # the flat copy holds these gradients now; finish() hands them back as views of it
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._works.append((work, flat, params))

    def finish(self) -> None:
        """Launch what backward did not (unused params), wait, and set each gradient to its reduced
        slice of the bucket (a view: the gradients are never held twice)."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for work, flat, params in self._works:
            work.wait()  # type: ignore[attr-defined]
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        self._reset()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class Engine:
    """One training-step interface for every strategy.

    The loop computes ``loss = sum of token losses / global token count`` for
    the whole optimizer step and calls :meth:`backward` on each micro-batch's
    part. Engines scale it so the resulting gradient is the exact gradient of
    the global mean, whatever the strategy averages internally.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
        self.model = model
        self.module = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.lora_params = lora_parameters(model)
        self.loss_multiplier = 1.0

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_multiplier).backward()

    def _sync_grads(self) -> None:
        pass

    def step(self, lr: float) -> float:
        """Reduce gradients, clip, update; returns the pre-clip global grad norm."""
        self._sync_grads()
        for p in self.lora_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.clip_grad_norm_(self.lora_params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def gathered_lora(self, modifier: bool = False) -> contextlib.AbstractContextManager:
        """Within this context every rank's LoRA params are whole (they always are, but under ZeRO)."""
        return contextlib.nullcontext()

    def finish_training(self) -> None:
        """Free what only further steps need (optimizer state, gradients) and reshard what the last
        forward left gathered, so an export that follows starts from the sharded state alone."""
        self.optimizer.zero_grad(set_to_none=True)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # DeepSpeed wraps the torch optimizer
        inner.state.clear()
        from torch.distributed.fsdp import FSDPModule

        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the full LoRA tensors by the model's names (for checkpoints and replica checks)."""
        out = {}
        with self.gathered_lora():
            for name, m in lora_modules(self.module):
                out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().clone()
                out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().clone()
        return out

    def _named_lora_data(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in lora_modules(self.module):
            out[f"{name}.lora_A.weight"] = m.lora_A.weight.data
            out[f"{name}.lora_B.weight"] = m.lora_B.weight.data
        return out

    def replica_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA values this rank computes with (what must agree across ranks)."""
        return self.lora_tensors()

    @torch.no_grad()
    def load_lora_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the LoRA params on this rank from full tensors (resume)."""
        with self.gathered_lora(modifier=True):
            for name, m in lora_modules(self.module):
                for part in ("lora_A", "lora_B"):
                    param = getattr(m, part).weight
                    param.copy_(tensors[f"{name}.{part}.weight"].to(param.dtype))


class FSDP2Engine(Engine):
    def __init__(self, model, optimizer, max_grad_norm, bucket_mb: float) -> None:
        super().__init__(model, optimizer, max_grad_norm)
        self.reducer = LoRAGradReducer(self.lora_params, bucket_mb)

    def no_sync(self):
        return self.reducer.no_sync()

    def _sync_grads(self) -> None:
        self.reducer.finish()


class DDPEngine(Engine):
    def __init__(self, model, optimizer, max_grad_norm, bucket_mb: float, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb)
        super().__init__(model, optimizer, max_grad_norm)
        self.model = ddp
        self.loss_multiplier = float(dist.get_world_size())  # DDP averages gradients

    def no_sync(self):
        return self.model.no_sync()


class DeepSpeedEngine(Engine):
    def __init__(self, model, optimizer, ds_config: dict) -> None:
        import deepspeed

        super().__init__(model, optimizer, ds_config.get("gradient_clipping", 0.0))
        ds_config = _cap_reduce_bucket(ds_config, sum(getattr(p, "ds_numel", p.numel()) for p in self.lora_params))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        # DeepSpeed averages over ranks and divides by the accumulation steps.
        self.loss_multiplier = float(dist.get_world_size() * ds_config["gradient_accumulation_steps"])
        self._gas = ds_config["gradient_accumulation_steps"]

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

    def replica_tensors(self) -> dict[str, torch.Tensor]:
        # Persistent ZeRO-3 params keep a whole copy that forward uses; compare that copy, not a re-gather.
        if all(p.data.numel() == getattr(p, "ds_numel", p.numel()) for p in self.lora_params):
            return {k: v.clone() for k, v in Engine._named_lora_data(self).items()}
        return self.lora_tensors()

    @torch.no_grad()
    def load_lora_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        super().load_lora_tensors(tensors)
        # The optimizer steps fp32 master copies of its partitions: set those too.
        for name, m in lora_modules(self.module):
            for part in ("lora_A", "lora_B"):
                safe_set_full_fp32_param(getattr(m, part).weight, tensors[f"{name}.{part}.weight"].float())

    def finish_training(self) -> None:
        super().finish_training()
        self.engine.empty_partition_cache()  # ZeRO-3: release the base weights the last forward gathered
        # ZeRO-3 keeps its reduce buckets allocated for the engine's life; no backward follows.
        getattr(self.optimizer, "ipg_buckets", {}).clear()

    def gathered_lora(self, modifier: bool = False):
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.lora_params, modifier_rank=0 if modifier else None)


def _cap_reduce_bucket(ds_config: dict, trainable_numel: int) -> dict:
    """``ds_config`` with ``reduce_bucket_size`` at most the number of trainable elements.

    DeepSpeed allocates the whole reduce bucket up front and keeps it for the life of the
    engine; a bucket larger than every gradient together buys nothing (one reduction either
    way) and only holds memory, which at LoRA sizes is most of the bucket.
    """
    zero = ds_config.get("zero_optimization")
    if not isinstance(zero, dict) or trainable_numel <= 0:
        return ds_config
    size = int(float(zero.get("reduce_bucket_size", 5e8)))  # DeepSpeed accepts "5e8" as well as ints
    if size <= trainable_numel:
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, "reduce_bucket_size": trainable_numel}}


def deepspeed_config(cfg: ParallelConfig, train: TrainConfig, lora_numel_max: int) -> dict:
    """DeepSpeed config for ``zero1/2/3`` generated from ours, or read from ``cfg.deepspeed_config``."""
    import json

    stage = int(cfg.strategy[-1])
    if cfg.deepspeed_config:
        with open(cfg.deepspeed_config) as f:
            ds = json.load(f)
    else:
        ds = {
            "zero_optimization": {
                "stage": stage,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_bucket_size": int(cfg.bucket_mb * 1e6 / 4),
                # LoRA tensors below this size stay whole (persistent) on every rank.
                "stage3_param_persistence_threshold": lora_numel_max + 1,
                # Release gathered base weights as soon as a module is done (DeepSpeed's defaults keep up
                # to 1e9 parameters live, i.e. the whole model at these sizes).
                "stage3_max_live_parameters": int(cfg.bucket_mb * 1e6 / 4),
                "stage3_max_reuse_distance": 0,
                "stage3_prefetch_bucket_size": int(cfg.bucket_mb * 1e6 / 4),
            },
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": cfg.mixed_precision == "bfloat16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum
    ds["gradient_clipping"] = train.max_grad_norm
    ds.pop("train_batch_size", None)
    return ds


def make_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ParallelConfig,
    train: TrainConfig,
    device: torch.device,
    ds_config: dict | None = None,
) -> Engine:
    """The training-step engine for ``cfg.strategy`` (model already materialized and loaded)."""
    if cfg.strategy == "fsdp2":
        return FSDP2Engine(model, optimizer, train.max_grad_norm, cfg.bucket_mb)
    if cfg.strategy == "ddp":
        return DDPEngine(model, optimizer, train.max_grad_norm, cfg.bucket_mb, device)
    if cfg.strategy.startswith("zero"):
        assert ds_config is not None
        return DeepSpeedEngine(model, optimizer, ds_config)
    return Engine(model, optimizer, train.max_grad_norm)


def check_replicas(engine: Engine) -> None:
    """Assert every LoRA tensor is bit-identical on all ranks.

    Raises:
        ReplicaMismatchError: naming the first tensor that differs.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tensors = engine.replica_tensors()
    names = sorted(tensors)
    differs = torch.zeros(len(names), dtype=torch.int32)
    for i, name in enumerate(names):
        local = tensors[name].contiguous()
        reference = local.clone()
        dist.broadcast(reference, src=0)
        differs[i] = int(not torch.equal(reference, local))
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    bad = [n for n, d in zip(names, differs.tolist()) if d]
    if bad:
        raise ReplicaMismatchError(
            f"LoRA replicas differ across ranks, first at {bad[0]} ({len(bad)} tensors differ); "
            "a rank applied a different update (non-deterministic op or a missed gradient sync)"
        )
