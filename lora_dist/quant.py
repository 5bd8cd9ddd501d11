"""QLoRA: which of the frozen base's weights are stored as NF4 (``model.quantize: nf4``), via torchao.

Which weights: the ``nn.Linear`` weights inside the transformer blocks (adapted or not), as QLoRA
does; with ``model.quantize_embeddings`` the input embedding and the output head too (the embedding's
forward dequantizes only the rows it looks up; the chunked loss dequantizes the head rows this rank
holds). Norms and biases keep ``model.dtype``. A weight is quantized where its local part is whole
NF4 groups (:data:`~lora_dist.nf4.GROUP` elements) and, sharded by fsdp2, its rows divide evenly over
the ranks; any other keeps ``model.dtype`` (logged, and counted so by :mod:`lora_dist.plan`).

The skeleton's weights become empty NF4 tensors before FSDP2 shards them (:func:`prepare_quantized`),
and each rank quantizes only the rows it reads as the base is loaded
(:func:`lora_dist.nf4.load_quantized`). Adapters and checkpoints record which weights were NF4
(:class:`NF4Record`), so an export or a resume on another sharding stores the same ones. The NF4 format
itself, its sharded quantization and the dequantizing forward, is :mod:`lora_dist.nf4`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from lora_dist.blocks import find_blocks
from lora_dist.errors import ConfigError
from lora_dist.lora import PLAIN_PROJECTIONS, LoRALinear, language_model, lora_parameters, read_by_weight
from lora_dist.nf4 import BLOCK, GROUP, SCALER_BLOCK, embedding_rows, frozen_linear, nf4_module, nf4_quantizable

__all__ = [
    "NF4Record",
    "NF4_SHARDS_KEY",
    "NF4_WEIGHTS_KEY",
    "QUANTIZE",
    "nf4_record",
    "prepare_quantized",
    "quantize_problem",
    "quantized_weights",
]


log = logging.getLogger(__name__)


#: ``model.quantize`` values: "" (off) or "nf4".
QUANTIZE = ("", "nf4")


#: Strategies NF4 runs under: the base is FSDP2-sharded or whole on every rank.
NF4_STRATEGIES = ("fsdp2", "ddp", "none")


def quantize_problem(quantize: str, strategy: str) -> str | None:
    """Why ``model.quantize`` with ``parallel.strategy`` cannot run (one line), or None."""
    if quantize not in QUANTIZE:
        return f"model.quantize={quantize!r} is not one of \"\" (off), nf4"
    if quantize and strategy not in NF4_STRATEGIES + ("auto",):
        return (f"model.quantize={quantize} runs under parallel.strategy fsdp2, ddp or none, not {strategy} "
                "(DeepSpeed partitions plain tensors only)")
    return None


def quantized_weights(model: nn.Module, embeddings: bool = False) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every weight :func:`prepare_quantized` considers: the linear layers' weights in the
    transformer blocks (LoRA-adapted ones and Falcon's plain projections included; GPT-2's transposed ``Conv1D``
    and the Mamba mixers' weights their code reads itself, :func:`~lora_dist.lora.read_by_weight`, excluded; a
    vision-language model's language model's only) and, with
    ``embeddings`` (``model.quantize_embeddings``), the input embedding and the output head (once where tied)."""
    out, seen = [], {id(p) for p in lora_parameters(model)}  # the adapters' own lora_A/lora_B stay as they are
    # A Mamba mixer's code reads these weights itself (Jamba's dt_proj.weight @ x, a fused scan's out_proj.weight):
    # they stay plain tensors in model.dtype
    direct = {id(model.get_submodule(name)) for name in read_by_weight(model)}

    def linear(module: nn.Module) -> bool:
        if id(module) in direct:
            return False
        return (type(module) in (nn.Linear, _NF4Linear) or type(module).__name__ in PLAIN_PROJECTIONS
                or (isinstance(module, LoRALinear) and not module.fan_in_fan_out))

    def add(module: nn.Module) -> None:
        if id(module) not in seen and id(module.weight) not in seen:
            seen.update((id(module), id(module.weight)))
            out.append((module, "weight"))

    # A vision-language model's vision tower never runs on text: it stays as stored, and is exported untouched.
    text = language_model(model)
    within = {id(m) for m in model.get_submodule(text).modules()} if text else None
    for block in find_blocks(model):
        if within is not None and id(block) not in within:
            continue
        for module in block.modules():
            if linear(module):
                add(module)
    if embeddings:
        holders: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            weight = module._parameters.get("weight")
            if weight is not None:
                holders.setdefault(id(weight), []).append(module)
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            # Only where every module holding the weight (a tied head and its embedding) computes with NF4: a
            # subclass with its own forward (Gemma's scaled embedding) keeps model.dtype.
            if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor) and all(
                    linear(m) or _embedding_quantizable(m) for m in holders.get(id(module.weight), [module])):
                add(module)
    return out


def _embedding_quantizable(module: nn.Module | None) -> bool:
    """An ``nn.Embedding`` whose rows are whole NF4 blocks and whose forward is a plain row lookup."""
    return (type(module) in (nn.Embedding, _NF4Embedding) and module.embedding_dim % BLOCK == 0
            and module.max_norm is None)


class _NF4Linear(nn.Linear):
    """An ``nn.Linear`` of a block whose weight is NF4: the same module, forward through :func:`frozen_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


class _NF4Embedding(nn.Embedding):
    """An ``nn.Embedding`` whose weight is NF4: forward dequantizes the rows it looks up (:func:`embedding_rows`)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding_rows(self.weight, ids)


#: Safetensors header keys of an :class:`NF4Record`: the NF4 weights (comma-separated; the merged export's header
#: names them too, for ``verify``) and the ranks their rows were split over (an adapter's header).
NF4_WEIGHTS_KEY = "lora_dist_quantized_weights"


NF4_SHARDS_KEY = "lora_dist_quantized_shards"


@dataclass(frozen=True)
class NF4Record:
    """The weights a run stored as NF4, and over how many ranks their rows were split: which weights are NF4 depends
    on that split (:func:`nf4_quantizable`). Adapters and checkpoints carry it, so that an export or a resume on
    another sharding stores the same weights as NF4, or says why it cannot."""

    weights: tuple[str, ...]
    shards: int

    def header(self) -> dict[str, str]:
        """The record as safetensors header metadata."""
        return {NF4_WEIGHTS_KEY: ",".join(self.weights), NF4_SHARDS_KEY: str(self.shards)}

    @classmethod
    def from_header(cls, metadata: dict[str, str]) -> NF4Record | None:
        """The record :meth:`header` wrote, or None where ``metadata`` holds none."""
        weights, shards = metadata.get(NF4_WEIGHTS_KEY), metadata.get(NF4_SHARDS_KEY, "")
        if weights is None or not shards.isdigit():
            return None
        return cls(tuple(filter(None, weights.split(","))), int(shards))


@torch.no_grad()
def prepare_quantized(model: nn.Module, quantize: str, shards: int, device: torch.device,
                      embeddings: bool = False, only: NF4Record | None = None) -> list[str]:
    """Turn the blocks' linear weights of the meta skeleton into (empty) NF4 tensors, before it is sharded.

    FSDP2 then shards them as NF4 (``Shard(0)`` DTensors of NF4 shards), materializing allocates only the
    NF4 bytes, and :func:`~lora_dist.nf4.load_quantized` fills each with the rank's rows as the base is read.

    Args:
        model: the skeleton, LoRA injected, every parameter on the meta device.
        quantize: ``model.quantize``.
        shards: ranks each weight's rows are split over (W under fsdp2, else 1).
        device: where the model is materialized.
        embeddings: ``model.quantize_embeddings``: the input embedding and the output head too.
        only: quantize exactly a run's NF4 weights (its export on another number of ranks): the others stay in
            ``model.dtype``.

    Returns:
        The names of the weights left in ``model.dtype``: their rows are not whole :data:`GROUP` s per rank.

    Raises:
        ConfigError: a weight in ``only`` cannot be quantized at this sharding (or is not in the model).
    """
    if not quantize:
        return []
    nf4 = nf4_module()
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight under its one name (DDP's)
    tables: dict[torch.dtype, torch.Tensor] = {}
    skipped, quantized = [], []
    considered = quantized_weights(model, embeddings)
    if embeddings:
        chosen = {id(m.weight) for m, _ in considered}
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and id(weight) not in chosen:
                log.info("model.quantize_embeddings: %s (%s) stays in model.dtype: its forward is not a plain "
                         "linear layer or row lookup, or its rows are not whole %d-element blocks",
                         names.get(id(weight), get), type(module).__name__, BLOCK)
    for module, attr in considered:
        param = module._parameters[attr]
        if only is not None and names.get(id(param)) not in only.weights:
            continue
        if not (param.is_floating_point() and nf4_quantizable(tuple(param.shape), shards)):
            skipped.append(names[id(param)])
            continue
        if param.dtype not in tables:  # torchao's 16 NF4 code values, in the dtype it dequantizes to
            tables[param.dtype] = nf4.to_nf4(torch.zeros(GROUP, dtype=param.dtype), BLOCK, SCALER_BLOCK).nf4.to(device)
        empty = nf4.to_nf4(torch.empty(param.shape, dtype=param.dtype, device="meta"), BLOCK, SCALER_BLOCK)
        # The mean and the table are not sharded: real tensors from the start (the mean is set at load).
        q = nf4.NF4Tensor(*nf4.construct_nf4_args(empty, {
            "scaler_mean": torch.zeros((), dtype=param.dtype, device=device), "nf4": tables[param.dtype]}))
        new = nn.Parameter(q, requires_grad=False)
        # Every module holding this parameter gets the NF4 one: a tied output head shares the embedding's.
        for holder in [m for m in model.modules() if m._parameters.get(attr) is param]:
            holder._parameters[attr] = new
            if type(holder) is nn.Linear or type(holder).__name__ in PLAIN_PROJECTIONS:  # Falcon's: x @ W.T + b
                holder.__class__ = _NF4Linear
            elif type(holder) is nn.Embedding:
                holder.__class__ = _NF4Embedding
        quantized.append(names[id(param)])
    missing = sorted(set(only.weights if only else ()) - set(quantized))
    if missing:
        if missing[0] not in names.values():
            raise ConfigError(f"the run stored {missing[0]} as NF4, but this model has no such weight: the run is "
                              "for another base; use the model.path it was trained on")
        where = "on 1 process" + (f" or on {only.shards} ranks" if only.shards > 1 else "")
        raise ConfigError(f"the run stored {missing[0]} as NF4 with its rows split over {only.shards} rank(s); split "
                          f"over {shards} here they are not whole {GROUP}-element NF4 groups: export it {where}")
    # DDP broadcasts rank 0's parameters when it wraps the model; c10d's broadcast corrupts NF4 tensors, and
    # every rank quantized the same base anyway: the list DDP leaves alone (what its
    # _set_params_and_buffers_to_ignore_for_model sets).
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + quantized
    model._lora_dist_nf4 = NF4Record(tuple(quantized), shards)  # what adapters and checkpoints record
    if skipped:
        log.info("model.quantize=%s: %d weight(s) not whole %d-element NF4 groups per rank stay in model.dtype: %s",
                 quantize, len(skipped), GROUP, ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return skipped


def nf4_record(model: nn.Module) -> NF4Record | None:
    """What :func:`prepare_quantized` stored as NF4 in ``model`` (maybe no weight); None where it never ran."""
    return getattr(model, "_lora_dist_nf4", None)
