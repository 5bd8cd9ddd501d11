"""One training-step interface for every strategy, and the owner of the training state.

The training loop sees only :class:`Engine`: ``no_sync`` for micro-steps inside
gradient accumulation, ``backward``, ``step``, the state it checkpoints
(:meth:`Engine.state_dict` / :meth:`Engine.load_state_dict`) in one form that
does not depend on the strategy or the world size (full fp32 LoRA tensors and
AdamW moments by the model's parameter names), and the outputs written from it:
:meth:`Engine.save_adapter` (PEFT format) and :meth:`Engine.export_merged` (from
the shards). Strategy internals (FSDP2's reducer, DDP's wrapper, DeepSpeed's flat
partitions) stay behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from inspect import signature
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.data import model_kwargs
from lora_dist.lora import lora_modules
from lora_dist.loss import ChunkedHeadLoss, ShardedHeadLoss, chunkable, sharded_head, token_loss_sum
from lora_dist.model_dir import ModelDir
from lora_dist.parallel.embedding import ShardedEmbedding, sharded_embedding
from lora_dist.parallel.reducer import LoRAGradReducer
from lora_dist.parallel.sharded_adamw import ShardedAdamW
from lora_dist.ranks import RankGroup
from lora_dist.sharding import vocab_sharding_pays

__all__ = ["DDPEngine", "Engine", "FSDP2Engine", "ReplicaMismatchError", "check_replicas"]

log = logging.getLogger("lora_dist")

#: AdamW moments a checkpoint keeps per LoRA tensor.
MOMENTS = ("exp_avg", "exp_avg_sq")


class ReplicaMismatchError(RuntimeError):
    """LoRA params differ across ranks: the replicas have drifted."""


class Engine:
    """The plain engine (one process, ``parallel.strategy=none``); the base of every strategy's engine.

    The loop computes ``loss = sum of token losses / global token count`` for
    the whole optimizer step and calls :meth:`backward` on each micro-batch's
    part. Engines scale it so the resulting gradient is the exact gradient of
    the global mean, whatever the strategy averages internally.

    Args:
        model: the LoRA model, sharded by :func:`~lora_dist.parallel.parallelize` where that applies.
        optimizer: a torch optimizer over the LoRA params.
        max_grad_norm: clip the global LoRA grad norm to this (0: no clipping).
        device: the run's device; every collective of the engine uses tensors on it.

    Attributes:
        base: the base model dir the model was loaded from (set by :func:`lora_dist.session.make_engine`); the
            adapter names it and the merged export reads the base's layout from it.
        base_dtype: the dtype the run keeps its base in (``model.dtype``; set by
            :func:`~lora_dist.session.make_engine`). The merged export reads an adapted weight the model holds in
            another dtype (DeepSpeed's bf16 mode casts a float32 base) from the base files.
        head_loss: the chunked head + loss :meth:`loss_sum` uses (:func:`lora_dist.session.make_engine` sets it from
            ``train.loss_chunk``; under fsdp2 over the head's vocabulary shards unless ``parallel.gather_head``),
            or None for the plain loss of the full logits.
        embedding: under fsdp2 the input embedding's lookup on its vocabulary shards (unless
            ``parallel.gather_embedding``; :func:`~lora_dist.session.make_engine` sets it), or None for the gathered
            lookup.
        sharded: ZeRO-1 over the LoRA (:class:`~lora_dist.parallel.sharded_adamw.ShardedAdamW`): when set, it
            reduces the gradients and steps 1/W of the AdamW state in place of ``optimizer``.
    """

    base: ModelDir | None = None
    base_dtype: torch.dtype | None = None
    head_loss: ChunkedHeadLoss | ShardedHeadLoss | None = None
    embedding: ShardedEmbedding | None = None
    sharded: ShardedAdamW | None = None

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 device: torch.device | None = None) -> None:
        self.model = model
        self.module = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.device = device or torch.device("cpu")
        #: The model's ``transformers`` config (attention implementation, windows), read before any wrapping.
        self.model_config = getattr(model, "config", None)
        self._named_lora = [(f"{name}.{part}.weight", getattr(m, part).weight)
                            for name, m in lora_modules(model) for part in ("lora_A", "lora_B")]
        self.lora_params = [p for _, p in self._named_lora]
        self.loss_multiplier = 1.0

    # ------------------------------------------------------------------ the step

    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Forward one micro-batch (:meth:`lora_dist.data.PackedDataset.inputs`' dict) through :attr:`model`;
        its summed fp32 next-token loss (:meth:`forward_loss_sum`)."""
        return self.forward_loss_sum(model_kwargs(batch, self.model_config), batch["labels"], batch.get("loss_rows"))

    def forward_loss_sum(self, inputs: Mapping[str, Any], labels: torch.Tensor,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
        """``model(**inputs)`` and the summed fp32 next-token loss of ``labels`` (``-100``: no loss), through the
        chunked head where :attr:`head_loss` is set: the full fp32 logits never exist (``rows``: the tokens that
        carry a loss, :func:`~lora_dist.loss.loss_rows`, found from ``labels`` where not given). Without a KV cache
        unless ``inputs`` asks for one: a training forward never reads it back (and compiled blocks would compile
        again for every layer's cache index)."""
        inputs = {"use_cache": False, **inputs}
        with self.embedding.installed() if self.embedding is not None else contextlib.nullcontext():
            if self.head_loss is None:
                return token_loss_sum(self.model(**inputs).logits, labels)
            with self.head_loss.installed():
                hidden = self.model(**inputs).logits
        return self.head_loss.loss_sum(hidden, labels, rows)

    def use_chunked_loss(self, chunk: int, gather_head: bool = True, tokens: int = 0) -> str | None:
        """Let :meth:`loss_sum` apply the head in chunks of ``chunk`` tokens (0: the plain loss), on the head's
        vocabulary shards where the head is an FSDP2 unit, not ``gather_head``, and that holds less for micro-batches
        of ``tokens`` tokens per rank (:func:`~lora_dist.sharding.vocab_sharding_pays`); returns why it cannot, where it
        cannot (the plain loss stays)."""
        why = chunkable(self.module) if chunk else None
        shard = sharded_head(self.module) if chunk and why is None and not gather_head else None
        if not chunk or why is not None:
            self.head_loss = None
        elif shard is not None and vocab_sharding_pays(self.module.get_output_embeddings().weight.shape[0],
                                                      dist.get_world_size(shard[3]), tokens):
            self.head_loss = ShardedHeadLoss(self.module, chunk)
        else:
            self.head_loss = ChunkedHeadLoss(self.module, chunk)
        return why

    def use_sharded_embedding(self, gather_embedding: bool, tokens: int, dtype: torch.dtype | None) -> None:
        """Let the forwards of :meth:`loss_sum` look the input embedding up on its vocabulary shards (never gathering
        it) where it is an FSDP2 unit, not ``gather_embedding``, and that holds less for micro-batches of ``tokens``
        tokens per rank; ``dtype``: FSDP2's compute dtype (None: the weight's), what the gathered lookup returns."""
        shard = None if gather_embedding else sharded_embedding(self.module)
        pays = shard is not None and vocab_sharding_pays(self.module.get_input_embeddings().weight.shape[0],
                                                         dist.get_world_size(shard[2]), tokens)
        self.embedding = ShardedEmbedding(self.module, dtype) if pays else None

    def no_sync(self) -> contextlib.AbstractContextManager:
        if self.sharded is not None:
            return self.sharded.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_multiplier).backward()

    def _sync_grads(self) -> None:
        pass

    def step(self, lr: float) -> float:
        """Reduce gradients, clip, update; returns the pre-clip global grad norm."""
        if self.sharded is not None:
            return self.sharded.step(lr, self.max_grad_norm)
        self._sync_grads()
        for p in self.lora_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.lora_params, limit)
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
        self.optimizer.state.clear()
        if self.sharded is not None:
            self.sharded.clear()
        from torch.distributed.fsdp import FSDPModule

        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # ------------------------------------------------------------------ the outputs

    def save_adapter(self, directory: str | os.PathLike, step: int | None = None,
                     chat_template: str | None = None) -> Path:
        """Write the fp32 LoRA state as a PEFT adapter (collective: call on every rank; rank 0 writes); ``step``, the
        training step it holds, is recorded in its header (:func:`lora_dist.adapter.adapter_step`), and
        ``chat_template``, the one training used, written beside it.

        Raises:
            AdapterError: the LoRA state is not finite or does not fit the model (on every rank).
            OutputDirError: ``directory`` cannot be written (a full disk...), naming what is intact (on every rank).
        """
        from safetensors import SafetensorError

        from lora_dist.adapter import save_adapter
        from lora_dist.outputs import write_failure

        lora = self.lora_state_dict()  # fp32, whatever the compute dtype (collective under ZeRO)
        base = str(self.base.path) if self.base is not None else None

        def write() -> Path:
            try:
                return save_adapter(self.module, directory, base, tensors=lora, step=step, chat_template=chat_template)
            except (OSError, SafetensorError) as e:
                raise write_failure(e, str(directory), "the previous adapter (if any) is intact") from None

        return RankGroup().on_rank0(write)

    def export_merged(self, out_dir: str | os.PathLike, *, dtype: str = "bfloat16", max_shard_size: str = "5GB",
                      overwrite: bool = False, keep_fp8: bool = True, chat_template: str | None = None) -> Path:
        """End training and write the merged checkpoint from the shards (collective: call on every rank).

        Frees the optimizer state first (:meth:`finish_training`): no step may follow. Each rank merges the fp32
        LoRA (:meth:`lora_state_dict`: DeepSpeed's masters, not its bf16 params) into the base bytes it holds and
        writes them (:func:`lora_dist.export.export_merged`); ``chat_template``, the one training used, is written
        in place of the base's.

        Raises:
            ExportError: as :func:`lora_dist.export.export_merged` (an existing ``out_dir`` without ``overwrite``...).
        """
        from lora_dist.dtypes import parse_dtype
        from lora_dist.export import export_merged

        if self.base is None:
            raise ValueError("this engine does not know its base model dir; make it with "
                             "lora_dist.session.make_engine(..., base=...)")
        lora = self.lora_state_dict()  # fp32, whatever the compute dtype (collective under ZeRO)
        self.finish_training()
        return export_merged(self.module, out_dir, self.base, dtype=parse_dtype(dtype), max_shard_size=max_shard_size,
                             overwrite=overwrite, lora=lora, base_dtype=self.base_dtype, keep_fp8=keep_fp8,
                             chat_template=chat_template)

    # ------------------------------------------------------------------ the state

    def named_lora_params(self) -> list[tuple[str, nn.Parameter]]:
        """``(<module>.lora_A.weight, param)`` pairs, in model order (found once, when the engine is made)."""
        return list(self._named_lora)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the full LoRA tensors by the model's names (collective under ZeRO-3)."""
        with self.gathered_lora():
            return {name: p.detach().clone() for name, p in self.named_lora_params()}

    def optimizer_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 AdamW moments on the CPU, ``<lora name>.exp_avg`` / ``.exp_avg_sq`` (collective under ZeRO)."""
        if self.sharded is not None:
            return self.sharded.state_dict()
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_lora_params():
            state = self.optimizer.state.get(p, {})
            for key in MOMENTS:
                if key in state:
                    out[f"{name}.{key}"] = state[key].detach().float().cpu().clone()
        return out

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The training state in a strategy- and world-size-independent form (collective under ZeRO)::

            {"lora": {<module>.lora_A.weight: tensor, ...}, "optimizer": {<name>.exp_avg: tensor, ...}}
        """
        return {"lora": self.lora_state_dict(), "optimizer": self.optimizer_state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> None:
        """Restore :meth:`state_dict`'s form, written by any strategy and world size; ``step`` optimizer
        steps were taken (AdamW's bias correction)."""
        self._load_lora(state["lora"])
        self._load_moments(state.get("optimizer", {}), step)

    def _load_lora(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with self.gathered_lora(modifier=True):
            for name, param in self.named_lora_params():
                param.copy_(tensors[name].to(param.dtype))

    def _load_moments(self, tensors: Mapping[str, torch.Tensor], step: int) -> None:
        if self.sharded is not None:
            self.sharded.load_state_dict(tensors, step)
            return
        for name, p in self.named_lora_params():
            if f"{name}.exp_avg" not in tensors:
                continue
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                **{key: tensors[f"{name}.{key}"].to(p.device, p.dtype).clone() for key in MOMENTS},
            }

    def replica_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA values this rank computes with (what must agree across ranks)."""
        return self.lora_state_dict()


def _sharded_adamw(engine: Engine, bucket_mb: float) -> ShardedAdamW:
    """ZeRO-1 over the engine's LoRA params, with the hyperparameters of the AdamW it was given."""
    d = engine.optimizer.defaults
    return ShardedAdamW(engine.named_lora_params(), lr=d["lr"], betas=d["betas"], eps=d["eps"],
                        weight_decay=d["weight_decay"], bucket_mb=bucket_mb)


class FSDP2Engine(Engine):
    """FSDP2: the base is sharded by ``fully_shard``; LoRA gradients are reduce-scattered to 1/W of the AdamW
    state (``shard_optimizer``) or all-reduced by :class:`LoRAGradReducer`."""

    def __init__(self, model, optimizer, max_grad_norm, bucket_mb: float, device: torch.device | None = None,
                 shard_optimizer: bool = False) -> None:
        super().__init__(model, optimizer, max_grad_norm, device)
        if shard_optimizer:
            self.sharded = _sharded_adamw(self, bucket_mb)
        else:
            self.reducer = LoRAGradReducer(self.lora_params, bucket_mb)

    def no_sync(self):
        return self.sharded.no_sync() if self.sharded is not None else self.reducer.no_sync()

    def _sync_grads(self) -> None:
        self.reducer.finish()


class DDPEngine(Engine):
    """DDP: every rank holds the whole base. With ``shard_optimizer`` the LoRA gradients are reduce-scattered to
    1/W of the AdamW state (no DDP wrapper: there is nothing else to reduce); else DDP all-reduces them (it
    averages, we scale back to a sum)."""

    def __init__(self, model, optimizer, max_grad_norm, bucket_mb: float, device: torch.device,
                 shard_optimizer: bool = False) -> None:
        super().__init__(model, optimizer, max_grad_norm, device)
        if shard_optimizer:
            self.sharded = _sharded_adamw(self, bucket_mb)
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every rank loaded the same frozen base from the files: DDP broadcasts only the LoRA from rank 0, not the
        # whole base (140 GB for a bf16 70B, at every start) nor, at every forward, the buffers (rotary tables).
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        model._ddp_params_and_buffers_to_ignore = sorted({*getattr(model, "_ddp_params_and_buffers_to_ignore", ()),
                                                          *frozen})
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in signature(DDP).parameters
                          else {"broadcast_buffers": False})  # torch < 2.13
        self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb,
                         **no_buffer_sync)
        self.loss_multiplier = float(dist.get_world_size())

    def no_sync(self):
        return self.sharded.no_sync() if self.sharded is not None else self.model.no_sync()


def check_replicas(engine: Engine) -> None:
    """Assert every LoRA tensor is bit-identical on all ranks.

    Raises:
        ReplicaMismatchError: naming the first tensor that differs.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tensors = engine.replica_tensors()
    names = sorted(tensors)
    differs = torch.zeros(len(names), dtype=torch.int32, device=engine.device)
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
