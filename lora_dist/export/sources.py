"""Where every output tensor's bytes come from, and which of them this rank produces.

An output tensor is produced from one of two sources, both cut into
:class:`Piece` s of flat element ranges in the output dtype:

* :class:`RowsSource`: a whole tensor every rank can read rows of (a base
  checkpoint tensor, or a param every rank holds whole); each rank takes its
  ``torch.chunk`` share of the rows.
* :class:`ShardSource`: the contiguous flat range of a sharded param this rank
  holds (an FSDP2 ``Shard(0)`` block of rows, a ZeRO-3 partition), as
  :func:`lora_dist.sharding.owned_range` describes it.

A base stored as block-scaled FP8 (:mod:`lora_dist.prequantized`) is written as it is stored
(:func:`stored_specs`): its tensors copied byte for byte, and each LoRA-adapted FP8 weight merged from the
base files and quantized again, whole blocks of rows at a time (:class:`FP8Merge`, serving its codes and
its ``weight_scale_inv`` through two :class:`FP8Source` s).

A LoRA-targeted tensor is merged on the way, by :func:`merge_flat`, in blocks of
:data:`MERGE_BLOCK_ROWS` rows at absolute row offsets (of each expert's matrix,
for a stack of experts), so the merged bytes do not depend on how the rows were
split. Every piece, merged or copied, is cast to the output dtype by
:func:`to_output`, which checks it is finite *in that dtype*: an fp16/bf16
overflow is refused, not written as Inf.
:func:`output_specs` says which tensors the output has: exactly the base
checkpoint's, each in the output dtype but those the model keeps in fp32
(:func:`output_dtype`, as ``save_pretrained`` writes them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from lora_dist.dtypes import FLOAT_DTYPES, all_finite, dtype_name, from_safetensors
from lora_dist.export.errors import ExportError, ExportOverflowError
from lora_dist.export.layout import TensorSpec
from lora_dist.merge import LoRAWeights, MergeError, adapter_shape, lora_rows, merge_weight
from lora_dist.model_dir import ModelDir
from lora_dist.nf4 import dequantize_flat, is_nf4
from lora_dist.prequantized import FP8Blocks, quantize_fp8
from lora_dist.quant import NF4_WEIGHTS_KEY
from lora_dist.sharding import ShardingError, owned_range, whole_local

__all__ = [
    "COPY_BLOCK_BYTES",
    "FP8Merge",
    "FP8Source",
    "MERGED_FROM_KEY",
    "QUANTIZED_DTYPE_KEY",
    "QUANTIZED_KEY",
    "QUANTIZED_WEIGHTS_KEY",
    "MERGE_BLOCK_ROWS",
    "Piece",
    "RowsSource",
    "ShardSource",
    "file_rows",
    "merge_flat",
    "merged_from",
    "natural_key",
    "output_dtype",
    "output_specs",
    "param_source",
    "stored_rows",
    "stored_specs",
    "to_output",
]

#: Rows per block of the LoRA update; fixed so the merged bits do not depend on the sharding.
MERGE_BLOCK_ROWS = 1024
#: Largest piece of a copied tensor read at once.
COPY_BLOCK_BYTES = 256 * 2**20
#: Safetensors metadata key: the dtype(s) the merged base weights had (verification's tolerance).
MERGED_FROM_KEY = "lora_dist_merged_base_dtype"
#: Safetensors metadata key, set ("nf4") when the base was quantized (``model.quantize``): the export holds the
#: dequantized base, merged with the adapter, not the original weights.
QUANTIZED_KEY = "lora_dist_quantized_base"
#: With :data:`QUANTIZED_KEY`: the quantized tensors' names (comma-separated) and the dtype they were quantized
#: from, so ``verify`` can recompute what the export merged into.
QUANTIZED_WEIGHTS_KEY = NF4_WEIGHTS_KEY
QUANTIZED_DTYPE_KEY = "lora_dist_quantized_dtype"


#: What to write instead when a dtype overflows: wider dtypes lora_dist can write.
_WIDER = {torch.float16: ("bfloat16", "float32"), torch.bfloat16: ("float32",)}


def to_output(values: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``values`` cast to the written ``dtype``, checked finite in it (floating dtypes).

    Args:
        values: a piece of a tensor, in the dtype it was computed or read in.
        dtype: the dtype it is written in.
        name: the tensor's name, for errors.

    Raises:
        ExportOverflowError: finite values that overflow ``dtype`` (fp16 above 65504), naming the tensor and
            the dtypes to write instead; or values that are NaN/Inf already (a corrupt base or model).
    """
    out = values.to(dtype)
    if dtype in FLOAT_DTYPES and not all_finite(out):
        raise _not_finite(values, out, dtype, name)
    return out


def _not_finite(values: torch.Tensor, out: torch.Tensor, dtype: torch.dtype, name: str) -> ExportOverflowError:
    bad = ~torch.isfinite(out)
    source = values[bad]
    if source.is_floating_point() and not all_finite(source):
        return ExportOverflowError(f"{name} holds NaN/Inf before the cast to {dtype_name(dtype)}; the base "
                                   "checkpoint or the trained model is corrupt. Nothing was written")
    largest = source.double().abs().max().item()
    wider = _WIDER.get(dtype)
    instead = (f"write {' or '.join(wider)} instead: --dtype {wider[0]} (lora-dist merge/export) or "
               f"export.dtype={wider[0]} (lora-dist train)") if wider else "keep the base's dtype (no --dtype)"
    return ExportOverflowError(
        f"{name}: {int(bad.sum())} value(s) up to {largest:.6g} overflow {dtype_name(dtype)} (largest finite "
        f"{torch.finfo(dtype).max:.6g}) and would be written as Inf; nothing was written: {instead}"
    )


def merge_flat(
    flat: torch.Tensor,
    start: int,
    end: int,
    shape: tuple[int, ...],
    lora: LoRAWeights,
    out_dtype: torch.dtype,
    name: str,
) -> torch.Tensor:
    """Elements ``[start, end)`` of the merged, row-major flattened weight, given those elements of the base.

    The update is computed per :data:`MERGE_BLOCK_ROWS`-row block at absolute
    offsets; a partial block (a shard edge, a ZeRO-3 partition cutting a row)
    is padded with zeros, merged, and cut. A stack of experts is merged expert
    by expert, in blocks of rows of each expert's matrix (with
    :func:`~lora_dist.merge.lora_rows`): only the experts ``[start, end)``
    touches, never more than a block of one expert at a time.

    Args:
        flat: the base weight's elements ``[start, end)``.
        start: first flat element.
        end: one past the last flat element.
        shape: the whole weight's shape.
        lora: the layer's LoRA A/B and scale.
        out_dtype: dtype of the result.
        name: the weight's name, for errors.

    Returns:
        ``end - start`` merged elements in ``out_dtype``, on ``flat``'s device.

    Raises:
        MergeError: the merge gives NaN/Inf (in fp32), or ``shape`` is not the adapter's (every dim of a stack).
        ExportOverflowError: the merged values overflow ``out_dtype``.
    """
    lora = dataclasses.replace(lora, lora_A=lora.lora_A.to(flat.device), lora_B=lora.lora_B.to(flat.device))
    out = torch.empty(end - start, dtype=out_dtype, device=flat.device)
    if not lora.num_experts:
        _merge_rows(flat, start, end, shape, lora, out, name)
        return out
    if tuple(shape) != adapter_shape(lora):
        raise MergeError(f"{name}: base shape {tuple(shape)} does not match the adapter's {adapter_shape(lora)}; "
                         "the adapter was trained for a different base model")
    size = math.prod(shape[1:])
    for e in range(start // size, -(-end // size)):
        lo, hi = max(start, e * size), min(end, (e + 1) * size)
        _merge_rows(flat[lo - start: hi - start], lo - e * size, hi - e * size, shape[1:],
                    lora_rows(lora, slice(None), e), out[lo - start: hi - start], name)
    return out


def _merge_rows(flat: torch.Tensor, start: int, end: int, shape: tuple[int, ...], lora: LoRAWeights,
                out: torch.Tensor, name: str) -> None:
    """:func:`merge_flat` of a plain adapter, written into ``out``."""
    rows, row_len = shape[0], math.prod(shape[1:])
    first, last = start // row_len, -(-end // row_len)
    b0 = first - first % MERGE_BLOCK_ROWS
    while b0 < last:
        b1 = min(b0 + MERGE_BLOCK_ROWS, rows)
        lo, hi = max(start, b0 * row_len), min(end, b1 * row_len)
        if lo == b0 * row_len and hi == b1 * row_len:
            block = flat[lo - start : hi - start]
        else:
            block = flat.new_zeros((b1 - b0) * row_len)
            block[lo - b0 * row_len : hi - b0 * row_len] = flat[lo - start : hi - start]
        # fp32 (checked finite by merge_weight), then cast and checked finite in the written dtype
        merged = merge_weight(block.view(b1 - b0, row_len), lora, rows=slice(b0, b1), out_dtype=torch.float32,
                              name=name)
        out[lo - start : hi - start] = to_output(merged.view(-1)[lo - b0 * row_len : hi - b0 * row_len], out.dtype,
                                                 name)
        b0 = b1


@dataclass
class Piece:
    """A flat element range ``[start, end)`` of one output tensor and how to produce it (in the output dtype)."""

    start: int
    end: int
    produce: Callable[[], torch.Tensor]


def _row_chunk(rows: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's rows under ``torch.chunk`` semantics (the last ranks may get fewer, or none)."""
    size = -(-rows // world) if rows else 0
    return min(rank * size, rows), min((rank + 1) * size, rows)


class RowsSource:
    """A whole tensor every rank can read rows of: a base checkpoint tensor, or a replicated param.

    With a shared output every rank writes its ``torch.chunk`` share of the
    rows; when rank 0 collects, rank 0 writes all of them.

    Args:
        read_rows: ``read_rows(a, b)`` gives rows ``[a, b)`` (the whole tensor for a scalar).
        spec: the output tensor.
        lora: the LoRA to merge in, or None to copy.
    """

    sharded = False

    def __init__(self, read_rows: Callable[[int, int], torch.Tensor], spec: TensorSpec, lora: LoRAWeights | None):
        self.read_rows, self.spec, self.lora = read_rows, spec, lora

    def pieces(self, rank: int, world: int) -> list[Piece]:
        """The pieces rank ``rank`` of ``world`` produces: row blocks of its share."""
        shape = self.spec.shape
        if not shape:
            return [Piece(0, 1, lambda: self.read_rows(0, 1).reshape(1).to(self.spec.dtype))] if rank == 0 else []
        row_len = math.prod(shape[1:])
        r0, r1 = _row_chunk(shape[0], world, rank)
        if self.lora is not None and not self.lora.num_experts:
            step = MERGE_BLOCK_ROWS
        else:  # a row of a stack of experts is an expert: as many as a copied block holds (merge_flat blocks each)
            step = max(1, COPY_BLOCK_BYTES // max(1, row_len * self.spec.itemsize))
        pieces, a = [], r0
        while a < r1:
            b = min(r1, (a // step + 1) * step)
            pieces.append(Piece(a * row_len, b * row_len, lambda a=a, b=b: self._produce(a, b)))
            a = b
        return pieces

    def _produce(self, a: int, b: int) -> torch.Tensor:
        flat = self.read_rows(a, b).reshape(-1)
        if self.lora is None:
            return to_output(flat, self.spec.dtype, self.spec.name)
        row_len = math.prod(self.spec.shape[1:])
        return merge_flat(flat, a * row_len, b * row_len, self.spec.shape, self.lora, self.spec.dtype, self.spec.name)


class ShardSource:
    """This rank's fixed part of a sharded param: flat elements ``[start, end)`` it holds locally.

    Args:
        local: the ``end - start`` elements, flat, or a function giving them when the piece is produced.
        start: first flat element of the whole tensor.
        end: one past the last.
        spec: the output tensor.
        lora: the LoRA to merge in, or None to copy.
    """

    sharded = True

    def __init__(self, local: torch.Tensor | Callable[[], torch.Tensor], start: int, end: int, spec: TensorSpec,
                 lora: LoRAWeights | None):
        self.local, self.start, self.end, self.spec, self.lora = local, start, end, spec, lora

    def pieces(self, rank: int, world: int) -> list[Piece]:
        """This rank's one piece (none where it owns nothing); ``rank`` and ``world`` are fixed by the sharding."""
        return [Piece(self.start, self.end, self._produce)] if self.end > self.start else []

    def _produce(self) -> torch.Tensor:
        local = self.local() if callable(self.local) else self.local
        if self.lora is None:
            return to_output(local, self.spec.dtype, self.spec.name)
        spec = self.spec
        return merge_flat(local, self.start, self.end, spec.shape, self.lora, spec.dtype, spec.name)


def param_source(param: torch.Tensor, spec: TensorSpec, lora: LoRAWeights | None) -> RowsSource | ShardSource:
    """Where this rank's rows of a (possibly sharded) model param are.

    Args:
        param: a plain tensor, an FSDP2 DTensor or a ZeRO-3 partitioned param.
        spec: the output tensor it becomes.
        lora: the LoRA to merge in, or None to copy.

    Raises:
        ExportError: naming the tensor, for a sharding :func:`~lora_dist.sharding.owned_range`
            does not cover (another placement, a partition offloaded to NVMe).
    """
    try:
        owned = owned_range(param)
    except ShardingError as e:
        raise ExportError(f"{spec.name}: {e}") from None
    # An NF4 base (model.quantize) is dequantized, a piece at a time, to the dtype it was quantized from: the
    # merge is into the dequantized weights the adapter was trained on.
    if owned is None:
        full = whole_local(param).detach()
        if is_nf4(full):
            row_len = math.prod(spec.shape[1:])
            return RowsSource(lambda a, b: dequantize_flat(full, a * row_len, b * row_len), spec, lora)
        return RowsSource(lambda a, b: full[a:b], spec, lora)
    if is_nf4(owned.local):
        local = owned.local.detach()
        if not getattr(owned, "primary", True):  # hybrid sharding: another replica group writes it
            return ShardSource(torch.empty(0), owned.start, owned.start, spec, lora)
        return ShardSource(lambda: dequantize_flat(local, 0, local.numel()), owned.start, owned.end, spec, lora)
    owned = owned.written()  # hybrid sharding: one replica group writes
    return ShardSource(owned.local.detach(), owned.start, owned.end, spec, lora)


def file_rows(base: ModelDir, key: str) -> Callable[[int, int], torch.Tensor]:
    """A ``read_rows(a, b)`` for :class:`RowsSource` reading rows of ``key`` from the base files."""
    if not base.shape(key):
        return lambda a, b: base.read(key)
    return lambda a, b: base.read(key, rows=slice(a, b))


def natural_key(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def output_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None, kept_in_fp32: bool) -> torch.dtype:
    """The dtype a base tensor stored in ``dtype`` is written in: ``out_dtype`` for a floating tensor (None keeps
    ``dtype``), but fp32 (or ``dtype`` where it is wider) for one the model keeps in fp32 (``kept_in_fp32``:
    :meth:`lora_dist.model_dir.ModelDir.kept_in_fp32`), as ``from_pretrained(dtype=...)`` loads it and
    ``save_pretrained`` writes it."""
    if out_dtype is None or dtype not in FLOAT_DTYPES:
        return dtype
    if kept_in_fp32:
        return dtype if dtype.itemsize > torch.float32.itemsize else torch.float32
    return out_dtype


def output_specs(base: ModelDir, out_dtype: torch.dtype | None) -> dict[str, TensorSpec]:
    """One spec per base tensor, in natural key order; floating tensors cast to ``out_dtype`` but those the model
    keeps in fp32 (:func:`output_dtype`).

    Args:
        base: the base checkpoint.
        out_dtype: dtype of the floating tensors written; None keeps the base's.
    """
    kept = base.kept_in_fp32(out_dtype)
    specs = {}
    for key in sorted(base.keys(), key=natural_key):
        dtype = output_dtype(from_safetensors(base.dtype(key)), out_dtype, kept(key))
        specs[key] = TensorSpec(key, dtype, base.shape(key))
    return specs


def merged_from(dtypes: Iterable[torch.dtype]) -> str:
    """The :data:`MERGED_FROM_KEY` metadata value: the merged base weights' dtypes, sorted, comma-separated."""
    return ",".join(sorted({dtype_name(d) for d in dtypes}))


def stored_specs(base: ModelDir, out_dtype: torch.dtype | None) -> dict[str, TensorSpec]:
    """One spec per tensor the base files store (an FP8 weight's codes and scales, activation scales), in natural
    key order: a block-scaled FP8 checkpoint written as it is stored. FP8 weights and their scales keep their
    dtypes; the other floating tensors are cast to ``out_dtype`` (None keeps the base's) as :func:`output_specs`
    casts them."""
    fp8 = {b.scale_key for b in (base.fp8_blocks(k) for k in base.keys()) if b is not None}
    fp8 |= {k for k in base.keys() if base.fp8_blocks(k) is not None}
    kept = base.kept_in_fp32(out_dtype)
    specs = {}
    for key in sorted(base.stored_keys(), key=natural_key):
        dtype = from_safetensors(base.stored_dtype(key))
        if key not in fp8 and not key.endswith(_SCALES):
            dtype = output_dtype(dtype, out_dtype, kept(key))
        specs[key] = TensorSpec(key, dtype, base.stored_shape(key))
    return specs


#: Stored tensors of an FP8 checkpoint that are scales, not weights: kept in their dtype like the weights' scales.
_SCALES = (".input_scale", ".activation_scale", "_scale_inv")


def stored_rows(base: ModelDir, key: str) -> Callable[[int, int], torch.Tensor]:
    """A ``read_rows(a, b)`` for :class:`RowsSource` reading rows of a tensor as the base files store it."""
    if not base.stored_shape(key):
        return lambda a, b: base.stored_read(key)
    return lambda a, b: base.stored_read(key, rows=slice(a, b))


class FP8Merge:
    """A LoRA-adapted weight of a block-scaled FP8 base, merged and stored again as the base stores it.

    The ranks split the weight's block rows (``torch.chunk`` of the scale grid's rows), so no block is cut:
    each reads its blocks' rows from the base files (dequantized, as training read them), merges them in fp32
    (:func:`merge_flat`: the same bits however the rows are split) and quantizes them
    (:func:`lora_dist.prequantized.quantize_fp8`). The codes and the scales are two output tensors: the scales
    a rank computed for its codes are kept (a float per block) for its scale pieces.

    Args:
        base: the base checkpoint.
        key: the weight's name.
        blocks: how the base stores it (:meth:`lora_dist.model_dir.ModelDir.fp8_blocks`).
        lora: the layer's LoRA.
    """

    def __init__(self, base: ModelDir, key: str, blocks: FP8Blocks, lora: LoRAWeights) -> None:
        self.base, self.key, self.blocks, self.lora = base, key, blocks, lora
        self.shape = base.shape(key)
        self.scales: dict[int, torch.Tensor] = {}

    def groups(self, rank: int, world: int) -> list[tuple[int, int]]:
        """This rank's runs of block rows ``[g0, g1)``, about :data:`MERGE_BLOCK_ROWS` rows each."""
        g0, g1 = _row_chunk(self.blocks.grid[0], world, rank)
        step = max(1, MERGE_BLOCK_ROWS // self.blocks.block[0])
        return [(g, min(g + step, g1)) for g in range(g0, g1, step)]

    def rows(self, g0: int, g1: int) -> tuple[int, int]:
        return g0 * self.blocks.block[0], min(g1 * self.blocks.block[0], self.shape[0])

    def quantized(self, g0: int, g1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes and scales of block rows ``[g0, g1)``."""
        (r0, r1), cols = self.rows(g0, g1), self.shape[1]
        merged = merge_flat(self.base.read(self.key, rows=slice(r0, r1)).reshape(-1), r0 * cols, r1 * cols,
                            self.shape, self.lora, torch.float32, self.key)
        codes, scale = quantize_fp8(merged.view(r1 - r0, cols), self.blocks)
        self.scales[g0] = scale
        return codes, scale


class FP8Source:
    """The codes (``part="codes"``) or the ``weight_scale_inv`` (``part="scales"``) of an :class:`FP8Merge`."""

    sharded = False

    def __init__(self, merge: FP8Merge, spec: TensorSpec, part: str) -> None:
        self.merge, self.spec, self.part = merge, spec, part

    def pieces(self, rank: int, world: int) -> list[Piece]:
        m, pieces = self.merge, []
        for g0, g1 in m.groups(rank, world):
            if self.part == "codes":
                r0, r1 = m.rows(g0, g1)
                pieces.append(Piece(r0 * m.shape[1], r1 * m.shape[1],
                                    lambda g0=g0, g1=g1: m.quantized(g0, g1)[0].reshape(-1)))
            else:
                width = m.blocks.grid[1]
                pieces.append(Piece(g0 * width, g1 * width, lambda g0=g0, g1=g1: self._scales(g0, g1)))
        return pieces

    def _scales(self, g0: int, g1: int) -> torch.Tensor:
        scale = self.merge.scales.pop(g0, None)
        return (scale if scale is not None else self.merge.quantized(g0, g1)[1]).reshape(-1)
