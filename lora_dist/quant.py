"""QLoRA: the frozen base's linear weights stored as NF4 (``model.quantize: nf4``), via torchao.

Which weights: the ``nn.Linear`` weights inside the transformer blocks (adapted or not), as QLoRA
does; with ``model.quantize_embeddings`` the input embedding and the output head too (the embedding's
forward dequantizes only the rows it looks up: :func:`embedding_rows`; the chunked loss dequantizes the
head rows this rank holds). Norms and biases keep ``model.dtype``. A weight is
quantized where its local part is whole NF4 groups (:data:`GROUP` elements:
``SCALER_BLOCK`` blocks of ``BLOCK`` elements) and, sharded by fsdp2, its rows divide evenly over
the ranks; any other keeps ``model.dtype`` (logged, and counted so by :mod:`lora_dist.plan`).

The skeleton's weights become empty NF4 tensors before FSDP2 shards them (:func:`prepare_quantized`), and
each rank quantizes only the rows it reads as the base is loaded (:func:`load_quantized`). NF4
has one number for the whole tensor (the mean of the block scales, subtracted before they are
quantized to int8); the ranks agree on it with one all-reduce, so a rank's NF4 shard is exactly
that rank's chunk of the whole tensor quantized in one piece, and FSDP2's all-gather of the NF4
shards (torchao's ``fsdp_pre_all_gather``/``fsdp_post_all_gather``) gives that whole tensor.

The forward dequantizes one weight at a time, in blocks, to the input's dtype
(:func:`frozen_linear`); backward dequantizes it again for the input gradient. The merged export
merges into the dequantized base (:func:`dequantize`), in fp32.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BLOCK",
    "GROUP",
    "NF4Record",
    "NF4_SHARDS_KEY",
    "NF4_WEIGHTS_KEY",
    "QUANTIZE",
    "SCALER_BLOCK",
    "dequantize",
    "dequantize_flat",
    "embedding_rows",
    "frozen_linear",
    "is_nf4",
    "is_quantized",
    "load_quantized",
    "nf4_bytes",
    "nf4_module",
    "nf4_record",
    "nf4_quantizable",
    "prepare_quantized",
    "quantize_problem",
    "quantize_whole",
    "quantized_weights",
]

log = logging.getLogger(__name__)

#: ``model.quantize`` values: "" (off) or "nf4".
QUANTIZE = ("", "nf4")
#: Strategies NF4 runs under: the base is FSDP2-sharded or whole on every rank.
NF4_STRATEGIES = ("fsdp2", "ddp", "none")
#: Elements per NF4 block (one absmax scale each) and blocks per scale-quantization block (torchao's defaults).
BLOCK = 64
SCALER_BLOCK = 256
#: The unit a tensor (or its local shard) must be whole multiples of.
GROUP = BLOCK * SCALER_BLOCK
_TORCHAO_NF4 = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
#: Packed bytes dequantized at a time (the transient beyond the dequantized weight itself).
_DEQUANT_CHUNK_BYTES = 1 << 20
#: An integer type as wide as two NF4 code values, by the code table's itemsize (:func:`_code_pairs`).
_PAIR_WORDS = {2: torch.int32, 4: torch.int64}


def quantize_problem(quantize: str, strategy: str) -> str | None:
    """Why ``model.quantize`` with ``parallel.strategy`` cannot run (one line), or None."""
    if quantize not in QUANTIZE:
        return f"model.quantize={quantize!r} is not one of \"\" (off), nf4"
    if quantize and strategy not in NF4_STRATEGIES + ("auto",):
        return (f"model.quantize={quantize} runs under parallel.strategy fsdp2, ddp or none, not {strategy} "
                "(DeepSpeed partitions plain tensors only)")
    return None


def nf4_module():
    """torchao's NF4 module, or a one-line error (ConfigError) naming the extra to install."""
    try:
        return importlib.import_module(_TORCHAO_NF4)
    except ImportError:
        from lora_dist.config import ConfigError

        raise ConfigError("model.quantize=nf4 needs torchao: pip install 'lora_dist[quant]'") from None


def is_nf4(t: torch.Tensor) -> bool:
    """Whether ``t`` (a local tensor, not a DTensor) is an NF4 tensor; False while torchao is not imported."""
    mod = sys.modules.get(_TORCHAO_NF4)
    return mod is not None and isinstance(t, mod.NF4Tensor)


def nf4_quantizable(shape: tuple[int, ...], shards: int) -> bool:
    """Whether a 2-D weight of ``shape``, its rows split evenly over ``shards`` ranks, is quantized."""
    if len(shape) != 2 or shape[0] % shards:
        return False
    local = shape[0] // shards * shape[1]
    return local > 0 and local % GROUP == 0


def nf4_bytes(numel: int, itemsize: int) -> int:
    """Bytes of an NF4 tensor of ``numel`` elements quantized from ``itemsize``-byte floats, as torchao lays it
    out: 4 bits per element, an int8 scale per :data:`BLOCK`, a float factor per :data:`GROUP`, and the mean
    and the 16-entry code table in the original dtype."""
    return numel // 2 + numel // BLOCK + numel // GROUP * itemsize + 17 * itemsize


def quantized_weights(model: nn.Module, embeddings: bool = False) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every weight :func:`prepare_quantized` considers: the linear layers' weights in the
    transformer blocks (LoRA-adapted ones included; GPT-2's transposed ``Conv1D`` excluded) and, with
    ``embeddings`` (``model.quantize_embeddings``), the input embedding and the output head (once where tied)."""
    from lora_dist.lora import LoRALinear, lora_parameters
    from lora_dist.parallel import find_blocks

    out, seen = [], {id(p) for p in lora_parameters(model)}  # the adapters' own lora_A/lora_B stay as they are

    def linear(module: nn.Module) -> bool:
        return type(module) in (nn.Linear, _NF4Linear) or (isinstance(module, LoRALinear) and not module.fan_in_fan_out)

    def add(module: nn.Module) -> None:
        if id(module) not in seen and id(module.weight) not in seen:
            seen.update((id(module), id(module.weight)))
            out.append((module, "weight"))

    for block in find_blocks(model):
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


def embedding_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)`` for a frozen ``weight``, NF4 or not: only the rows looked up are dequantized.

    A row of an NF4 embedding is whole blocks (:func:`_embedding_quantizable`), so its values are its packed
    bytes through the code table times its blocks' scales, computed as torchao's dequantization computes them
    (bitwise :func:`dequantize` of the whole weight, then the lookup).
    """
    if not is_nf4(weight):
        return F.embedding(ids, weight)
    rows, dim = weight.shape
    per_row = dim // weight.block_size
    flat = ids.reshape(-1)
    packed = weight.quantized_data.view(rows, dim // 2)[flat]
    blocks = flat[:, None] * per_row + torch.arange(per_row, device=flat.device)
    factor = weight.quantization_factor[blocks // weight.scaler_block_size]
    scales = (weight.quantized_scalers[blocks] / factor).to(weight.dtype) + weight.scaler_mean
    return _decode(weight, packed.reshape(-1), scales.reshape(-1), _code_pairs(weight)).view(*ids.shape, dim)


def _code_pairs(t) -> torch.Tensor | None:
    """NF4 ``t``'s code table as pairs: for each of the 256 byte values, its two codes side by side in one integer
    word (``None`` where no integer type is two codes wide: a float64 table).

    Made once per code table and kept on it: the weights of one dtype share one table (:func:`prepare_quantized`),
    and on a GPU the six small kernels that make it would otherwise be launched for every dequantization. A copy
    of the table (a device move: FSDP2 copies each host-memory shard to the GPU under ``parallel.cpu_offload``)
    makes its pairs again."""
    table = t.nf4
    cached = getattr(table, "_lora_dist_pairs", None)
    if cached is not None:
        return cached
    word = _PAIR_WORDS.get(table.element_size())
    if word is None:
        return None
    byte = torch.arange(256, device=table.device)
    table._lora_dist_pairs = torch.stack([table[byte >> 4], table[byte & 0b1111]], dim=-1).view(word).view(256)
    return table._lora_dist_pairs


def _decode(t, packed: torch.Tensor, scales: torch.Tensor, pairs: torch.Tensor | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Whole blocks of NF4 ``t``: their ``packed`` bytes (two codes each) through the code table, times each
    block's scale; ``(blocks, block_size)`` in the table's dtype (written into ``out``, that shape, if given).

    ``pairs`` is :func:`_code_pairs` of ``t`` (kept on its code table), from the caller: each byte is looked up once
    there, one gather instead of two gathers, two bit operations and an interleave, the same values (6-8x faster
    on a CPU for a bf16 weight).
    """
    if pairs is None:  # no integer type two codes wide: each nibble looked up
        values = torch.stack([t.nf4[(packed >> 4).long()], t.nf4[(packed & 0b1111).long()]], dim=-1)
    else:
        values = pairs.index_select(0, packed.int()).view(t.nf4.dtype)
    return torch.mul(values.view(scales.numel(), t.block_size), scales.unsqueeze(-1), out=out)


def _local(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this rank holds of ``param`` and over how many ranks its rows are split."""
    from lora_dist.parallel.sharding import is_dtensor

    if is_dtensor(param):
        from torch.distributed.tensor import Shard

        shards = math.prod(param.device_mesh.size(i) for i, p in enumerate(param.placements) if isinstance(p, Shard))
        return param.to_local(), shards
    return param.data, 1


def is_quantized(param: torch.Tensor) -> bool:
    """Whether this rank holds ``param`` (plain or DTensor) as NF4."""
    return is_nf4(_local(param)[0])


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
    NF4 bytes, and :func:`load_quantized` fills each with the rank's rows as the base is read.

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
            if type(holder) is nn.Linear:
                holder.__class__ = _NF4Linear
            elif type(holder) is nn.Embedding:
                holder.__class__ = _NF4Embedding
        quantized.append(names[id(param)])
    missing = sorted(set(only.weights if only else ()) - set(quantized))
    if missing:
        from lora_dist.config import ConfigError

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


@torch.no_grad()
def load_quantized(param: torch.Tensor, values: torch.Tensor) -> None:
    """Quantize this rank's ``values`` of an NF4 ``param`` into it. Collective over its shards (fsdp2).

    ``values`` are the elements the rank owns (its rows), read from the checkpoint. The ranks holding the
    weight's rows all-reduce the sum of their block scales: the tensor's one mean is that of the whole
    weight, so the shard is the rank's chunk of the weight quantized whole (bit for bit where the float64 sum of
    the mean rounds alike for every split, as it does but for ties in the last bit).
    """
    nf4 = nf4_module()
    local, shards = _local(param)
    values = values.to(device=local.device, dtype=local.dtype).reshape(local.shape).contiguous()
    # Summed in float64: the mean then rounds to the same value whatever the ranks' split (1 ulp apart in fp32 it
    # moved the adapter trained on an NF4 embedding ten times more than another summation order does).
    total = _scale_sum(nf4, values)
    if shards > 1:  # over the ranks holding the weight's rows (the shard dim of an HSDP mesh)
        import torch.distributed as dist
        from torch.distributed.tensor import Shard

        for dim, placement in enumerate(param.placements):
            if isinstance(placement, Shard):
                dist.all_reduce(total, group=param.device_mesh.get_group(dim))
    q = _to_nf4(nf4, values, _mean(total, param.numel(), local.dtype))
    # Copied into the tensors FSDP2 holds (a DTensor's to_local() is a new wrapper around the same storage).
    for attr in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
        getattr(local, attr).copy_(getattr(q, attr))


def quantize_whole(weight: torch.Tensor):
    """The NF4 tensor of a whole ``weight`` as :func:`load_quantized` makes it (torchao's, the block scales' mean
    summed in float64): what the ranks' shards are chunks of, bit for bit."""
    nf4 = nf4_module()
    return _to_nf4(nf4, weight.contiguous(), _mean(_scale_sum(nf4, weight), weight.numel(), weight.dtype))


def _scale_sum(nf4, values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values``' block scales (absmax per :data:`BLOCK`), in float64: the ranks' partial sums add up
    to one value whatever the split, before the mean is rounded to the weight's dtype."""
    return nf4.get_block_absmax(values.reshape(-1), BLOCK).double().sum()


def _mean(total: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """NF4's one number for a tensor of ``numel`` elements: the mean of its block scales, from their sum."""
    return (total / (numel // BLOCK)).to(dtype)


def _to_nf4(nf4, local: torch.Tensor, mean: torch.Tensor):
    """torchao's ``to_nf4(local)`` with the block scales' mean of the whole tensor in place of ``local``'s own."""
    q = nf4.to_nf4(local, BLOCK, SCALER_BLOCK)
    scalers = nf4.get_block_absmax(local.reshape(-1), BLOCK) - mean
    groups = scalers.view(-1, SCALER_BLOCK)
    factor = 256 / (2 * groups.abs().max(dim=1).values)
    quantized = (groups * factor.unsqueeze(-1)).round().clamp(-128, 127).flatten().to(torch.int8)
    return nf4.NF4Tensor(*nf4.construct_nf4_args(q, {
        "quantized_scalers": quantized, "quantization_factor": factor.contiguous(), "scaler_mean": mean}))


def dequantize(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` in ``dtype`` (default: the dtype it was quantized from); a non-NF4 tensor is returned as it is.

    Bitwise torchao's ``get_original_weight`` (then cast), computed a block at a time: the transient beyond
    the result is one 1 MB chunk of packed bytes being decoded (8.5 MB for a bf16 result, 12.8 MB for fp32,
    measured), not torchao's 8 bytes per element.
    """
    if not is_nf4(t):
        return t if dtype is None else t.to(dtype)
    return dequantize_flat(t, 0, t.numel(), dtype).view(t.shape)


def dequantize_flat(t: torch.Tensor, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Flat elements ``[start, end)`` of an NF4 tensor ``t``, dequantized (see :func:`dequantize`)."""
    dtype = dtype or t.dtype
    out = torch.empty(end - start, dtype=dtype, device=t.quantized_data.device)
    if end <= start:
        return out
    block = t.block_size
    b0, b1 = start // block, -(-end // block)
    scalers = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)
    data = t.quantized_data
    step = max(1, _DEQUANT_CHUNK_BYTES // (block // 2))  # blocks per chunk (a block packs 2 elements a byte)
    pairs = _code_pairs(t)
    for c0 in range(b0, b1, step):
        c1 = min(c0 + step, b1)
        packed, scales = data[c0 * block // 2: c1 * block // 2], scalers[c0:c1]
        lo, hi = max(start, c0 * block), min(end, c1 * block)
        if dtype == t.nf4.dtype and (lo, hi) == (c0 * block, c1 * block):  # whole blocks: decoded in place
            _decode(t, packed, scales, pairs, out=out[lo - start: hi - start].view(c1 - c0, block))
        else:
            values = _decode(t, packed, scales, pairs).view(-1)
            out[lo - start: hi - start] = values[lo - c0 * block: hi - c0 * block].to(dtype)
    return out


class _FrozenNF4Linear(torch.autograd.Function):
    """``x @ W.T`` for a frozen NF4 ``W``: dequantized for the matmul, again in backward; only ``x`` gets a grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ dequantize(weight, grad.dtype), None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` that also takes an NF4 ``weight`` (dequantized to ``x``'s dtype)."""
    if not is_nf4(weight):
        return F.linear(x, weight, bias)
    out = _FrozenNF4Linear.apply(x, weight)
    return out if bias is None else out + bias.to(out.dtype)
