"""The NF4 tensor format of a QLoRA base (torchao's ``NF4Tensor``): quantized shard by shard, dequantized a block at
a time, and used by the frozen linear layers and embeddings. Which weights are NF4 is :mod:`lora_dist.quant`.

Each rank quantizes only the rows it reads as the base is loaded (:func:`load_quantized`). NF4
has one number for the whole tensor (the mean of the block scales, subtracted before they are
quantized to int8); the ranks agree on it with one all-reduce, so a rank's NF4 shard is exactly
that rank's chunk of the whole tensor quantized in one piece (:func:`quantize_whole`), and FSDP2's
all-gather of the NF4 shards (torchao's ``fsdp_pre_all_gather``/``fsdp_post_all_gather``) gives that
whole tensor.

The forward dequantizes one weight at a time, in blocks, to the input's dtype
(:func:`frozen_linear`); backward dequantizes it again for the input gradient. An NF4 embedding
dequantizes only the rows it looks up (:func:`embedding_rows`), and the loss an NF4 head a block of vocabulary
rows at a time (:func:`dequantize_rows`, :mod:`lora_dist.loss`). The merged export merges into the
dequantized base (:func:`dequantize`), in fp32.
"""

from __future__ import annotations

import importlib
import math
import sys

import torch
import torch.nn.functional as F

from lora_dist.errors import ConfigError
from lora_dist.sharding import is_dtensor

__all__ = [
    "BLOCK",
    "GROUP",
    "SCALER_BLOCK",
    "dequantize",
    "dequantize_flat",
    "dequantize_rows",
    "embedding_rows",
    "frozen_linear",
    "is_nf4",
    "is_quantized",
    "load_quantized",
    "nf4_bytes",
    "nf4_module",
    "nf4_quantizable",
    "quantize_whole",
]

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


def nf4_module():
    """torchao's NF4 module, or a one-line error (ConfigError) naming the extra to install."""
    try:
        return importlib.import_module(_TORCHAO_NF4)
    except ImportError:
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


def embedding_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)`` for a frozen ``weight``, NF4 or not: only the rows looked up are dequantized.

    A row of an NF4 embedding is whole blocks (:func:`lora_dist.quant.quantized_weights` quantizes no other), so
    its values are its packed bytes through the code table times its blocks' scales, computed as torchao's
    dequantization computes them (bitwise :func:`dequantize` of the whole weight, then the lookup).
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

    Made once per code table and kept on it: the weights of one dtype share one table
    (:func:`lora_dist.quant.prepare_quantized`), and on a GPU the six small kernels that make it would otherwise be
    launched for every dequantization. A copy of the table (a device move: FSDP2 copies each host-memory shard to
    the GPU under ``parallel.cpu_offload``) makes its pairs again."""
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
    if is_dtensor(param):
        from torch.distributed.tensor import Shard

        shards = math.prod(param.device_mesh.size(i) for i, p in enumerate(param.placements) if isinstance(p, Shard))
        return param.to_local(), shards
    return param.data, 1


def is_quantized(param: torch.Tensor) -> bool:
    """Whether this rank holds ``param`` (plain or DTensor) as NF4."""
    return is_nf4(_local(param)[0])


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

        # On the mesh's device: under parallel.cpu_offload the shard is on the host, and a process group with
        # no CPU backend (an NCCL-only one that accelerate made before lora_dist) takes only device tensors.
        reduced = total.to(param.device_mesh.device_type)
        for dim, placement in enumerate(param.placements):
            if isinstance(placement, Shard):
                dist.all_reduce(reduced, group=param.device_mesh.get_group(dim))
        total = reduced.to(total.device)
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
    block, per_group = t.block_size, t.scaler_block_size
    b0, b1 = start // block, -(-end // block)
    # the scales of the scale groups holding blocks b0..b1 only (a block of a head's rows: not the whole head's)
    first = b0 // per_group * per_group
    scalers = t.dequantize_scalers(t.quantized_scalers[first: -(-b1 // per_group) * per_group],
                                   t.quantization_factor[first // per_group: -(-b1 // per_group)], per_group)
    data = t.quantized_data
    step = max(1, _DEQUANT_CHUNK_BYTES // (block // 2))  # blocks per chunk (a block packs 2 elements a byte)
    pairs = _code_pairs(t)
    for c0 in range(b0, b1, step):
        c1 = min(c0 + step, b1)
        packed, scales = data[c0 * block // 2: c1 * block // 2], scalers[c0 - first: c1 - first]
        lo, hi = max(start, c0 * block), min(end, c1 * block)
        if dtype == t.nf4.dtype and (lo, hi) == (c0 * block, c1 * block):  # whole blocks: decoded in place
            _decode(t, packed, scales, pairs, out=out[lo - start: hi - start].view(c1 - c0, block))
        else:
            values = _decode(t, packed, scales, pairs).view(-1)
            out[lo - start: hi - start] = values[lo - c0 * block: hi - c0 * block].to(dtype)
    return out


def dequantize_rows(t: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[start, end)`` of a 2-D weight ``t`` in ``dtype``, NF4 or not: only those rows are dequantized (or cast)."""
    if not is_nf4(t):
        return t[start:end].to(dtype)
    cols = t.shape[1]
    return dequantize_flat(t, start * cols, end * cols, dtype).view(end - start, cols)


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
