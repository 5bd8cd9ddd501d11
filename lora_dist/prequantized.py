"""Checkpoints the Hub publishes quantized, read as the dense weights they stand for.

Many MoE checkpoints are published quantized, with ``quantization_config`` in their ``config.json``:

* **block-scaled FP8** (``quant_method: fp8``; DeepSeek-V3/R1, the Qwen3 ``-FP8`` releases, MiniMax-M2): a ``weight`` stored as ``F8_E4M3`` (or ``F8_E5M2``) next to a ``weight_scale_inv`` with one
  float per ``weight_block_size`` block (128 x 128). The weight is ``fp8 x scale_inv``, block by block;
  the embedding, the head, norms and routers are stored unquantized.
* **MXFP4** (``quant_method: mxfp4``; gpt-oss): each expert weight ``W`` of ``(E, in, out)`` is stored as
  ``W_blocks`` ``(E, out, in / 32, 16)`` bytes, two FP4 (E2M1) values per byte, low nibble first, and
  ``W_scales`` ``(E, out, in / 32)``, one power of two per 32 values (E8M0: ``2 ** (byte - 127)``).

LoRA trains on the dense weights, as transformers' own ``dequantize=True`` loading does: :func:`dense_view`
names, for every weight stored quantized, the dense tensor it stands for (its name, shape and dtype: the name
and layout of the model's unquantized release) and reads any rows of it, dequantizing only those rows
(a rank reads its own shard). :class:`lora_dist.model_dir.ModelDir` shows these in place of the stored
tensors, so the loader, the merged export, ``lora-dist merge`` and ``verify`` see an unquantized checkpoint.
The merged export writes an FP8 base as it is stored (:func:`quantize_fp8` quantizes each adapted weight's
merge again; :meth:`lora_dist.model_dir.ModelDir.fp8_blocks` says how), or, with ``export.keep_fp8=false``
and for MXFP4, a dense checkpoint in ``export.dtype`` with no ``quantization_config``. Every other
quantization method is refused when the dir is opened, in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from lora_dist.dtypes import FLOAT_DTYPES, from_safetensors, to_safetensors
from lora_dist.errors import UserError

__all__ = ["DenseTensor", "DenseView", "FP8Blocks", "PrequantizedError", "dense_view", "dequantize_fp8",
           "dequantize_mxfp4", "fp8_block_amax", "fp8_scale_values", "fp8_scales", "quantization_method", "quantize_fp8"]

#: The methods read as dense weights (``quantization_config.quant_method``).
SUPPORTED = ("fp8", "mxfp4")

#: The FP4 (E2M1) value of each 4-bit code.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_FP8 = ("F8_E4M3", "F8_E5M2")
#: What an FP8 checkpoint stores beside the weights for FP8 activations (static scheme): not weights.
_ACTIVATION_SCALES = (".input_scale", ".activation_scale")


class PrequantizedError(UserError, ValueError):
    """A quantized checkpoint lora_dist cannot read as dense weights."""


class Stored(Protocol):
    """The stored tensors of a model dir, as they are in the files."""

    def stored_keys(self) -> list[str]: ...

    def stored_shape(self, key: str) -> tuple[int, ...]: ...

    def stored_dtype(self, key: str) -> str: ...

    def stored_read(self, key: str, rows: slice | None = None) -> torch.Tensor: ...


def _fix() -> str:
    return ("lora_dist reads unquantized, block-scaled FP8 (quant_method fp8) and MXFP4 (gpt-oss) checkpoints: use "
            "the model's unquantized release (model.quantize=nf4 quantizes the base as it loads)")


def quantization_method(config: dict, path) -> str | None:
    """``config.json``'s quantization method, None for an unquantized checkpoint.

    Raises:
        PrequantizedError: a method lora_dist cannot read as dense weights (bitsandbytes, GPTQ, AWQ,
            compressed-tensors, ...).
    """
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in SUPPORTED:
        name = repr(method) if method else "an unnamed method"
        raise PrequantizedError(f"{path}/config.json: the checkpoint is quantized with {name}; {_fix()}")
    return method


@dataclass(frozen=True)
class FP8Blocks:
    """How a block-scaled FP8 weight is stored: its codes' dtype, its scale tensor, dtype and grid, the block."""

    codes: torch.dtype  # float8_e4m3fn or float8_e5m2
    scale_key: str
    scale_dtype: torch.dtype  # float32, bfloat16, float16, float8_e8m0fnu, or uint8 (E8M0: 2 ** (byte - 127))
    scale_shape: tuple[int, ...]  # (rows, cols) blocks, or () for one scale
    block: tuple[int, int]
    pow2: bool = False  # scales are powers of two (quantization_config.scale_fmt "ue8m0", or an E8M0 dtype)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.scale_shape) if self.scale_shape else (1, 1)


class DenseTensor:
    """A dense tensor of a quantized checkpoint: its name, shape and dtype, and the stored tensors behind it
    (``fp8``: how a block-scaled FP8 weight stores it)."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, parts: tuple[str, ...],
                 read: Callable[[Stored, slice], torch.Tensor], fp8: FP8Blocks | None = None) -> None:
        self.key, self.shape, self.dtype, self.parts, self._read = key, tuple(shape), dtype, parts, read
        self.fp8 = fp8

    @property
    def safetensors_dtype(self) -> str:
        return to_safetensors(self.dtype)

    def read(self, stored: Stored, rows: slice | None = None) -> torch.Tensor:
        """The tensor, or rows ``rows`` (a step-1 slice) of its first dimension, dequantizing only those."""
        first, last, _ = (rows or slice(None)).indices(self.shape[0])
        return self._read(stored, slice(first, max(first, last))).to(self.dtype)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   first_row: int = 0) -> torch.Tensor:
    """``weight`` (rows ``first_row...`` of an FP8 matrix) times its blocks' ``scale_inv``, in fp32.

    ``scale_inv`` holds the scale rows of those rows' blocks (from block ``first_row // block[0]`` on).
    """
    rows, cols = weight.shape
    scale = fp8_scale_values(scale_inv)
    index = (torch.arange(first_row, first_row + rows) // block[0]) - first_row // block[0]
    expanded = scale.index_select(0, index).repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.float() * expanded


def fp8_scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Stored FP8 block scales as fp32 (E8M0 bytes as ``2 ** (byte - 127)``)."""
    return scale.float() if scale.dtype != torch.uint8 else torch.exp2(scale.float() - 127.0)


def _tiles(values: torch.Tensor, blocks: FP8Blocks) -> torch.Tensor:
    """``values`` (whole block rows, fp32) as ``(grid rows, block rows, grid columns, block columns)`` tiles,
    zero-padded where the last blocks overhang."""
    rows, cols = values.shape
    br, bc = blocks.block
    grid = (math.ceil(rows / br), math.ceil(cols / bc))
    padded = torch.nn.functional.pad(values.float(), (0, grid[1] * bc - cols, 0, grid[0] * br - rows))
    return padded.view(grid[0], br, grid[1], bc)


def fp8_scales(amax: torch.Tensor, blocks: FP8Blocks) -> torch.Tensor:
    """The stored scale of blocks whose largest magnitudes are ``amax``: ``amax`` over the format's largest value
    (1 for an all-zero block), rounded up to a power of two where ``blocks.pow2`` (E8M0, ``scale_fmt: ue8m0``), in
    ``blocks.scale_dtype`` (bf16 and fp16 round to nearest)."""
    scale = torch.where(amax > 0, amax / torch.finfo(blocks.codes).max, torch.ones_like(amax))
    if blocks.pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)).clamp(-127, 127))
    if blocks.scale_dtype == torch.uint8:
        return (torch.log2(scale) + 127).round().clamp(0, 254).to(torch.uint8)
    return scale.to(blocks.scale_dtype)


def quantize_fp8(values: torch.Tensor, blocks: FP8Blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole block rows of a weight (``values``, fp32, starting at a block's first row) stored as ``blocks`` says:
    each block's scale by :func:`fp8_scales`, and its codes ``values / scale`` rounded to the nearest FP8 value,
    clamped to the format's range.

    Returns:
        ``(codes, scale)``: ``values``' shape in ``blocks.codes``, and ``(block rows, grid columns)`` scales in
        ``blocks.scale_dtype`` (``()`` for a one-scale weight).
    """
    rows, cols = values.shape
    tiles = _tiles(values, blocks)
    stored = fp8_scales(tiles.abs().amax(dim=(1, 3)), blocks)
    top = torch.finfo(blocks.codes).max
    codes = (tiles / fp8_scale_values(stored)[:, None, :, None]).clamp(-top, top).flatten(2, 3).flatten(0, 1)
    return codes[:rows, :cols].to(blocks.codes), stored.reshape(blocks.scale_shape) if not blocks.scale_shape else stored


def fp8_block_amax(values: torch.Tensor, blocks: FP8Blocks) -> torch.Tensor:
    """The largest magnitude of each block of ``values`` (whole block rows, fp32)."""
    return _tiles(values, blocks).abs().amax(dim=(1, 3))


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 ``blocks`` ``(..., G, 16)`` and ``scales`` ``(..., G)`` as fp32 values ``(..., 32 G)``: each byte's
    low nibble, then its high one, times ``2 ** (scale - 127)`` (exact in fp32 and bf16)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # (..., G, 16, 2)
    values = lut[codes].flatten(-2)  # (..., G, 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())
    return values.flatten(-2)


def _fp8_dense(key: str, stored: Stored, config: dict, dtype: torch.dtype, path) -> DenseTensor:
    scale_key = key + "_scale_inv"
    shape = stored.stored_shape(key)
    grid = stored.stored_shape(scale_key)
    if len(shape) != 2 or len(grid) not in (0, 2):
        raise PrequantizedError(f"{path}: {key} {shape} with {scale_key} {grid} is not a block-scaled FP8 matrix; "
                                f"{_fix()}")
    size = config.get("weight_block_size")
    if size is None:  # one scale per tensor, or blocks that divide the weight evenly
        block = (shape[0] // (grid[0] if grid else 1), shape[1] // (grid[1] if grid else 1))
    else:
        block = (int(size[0]), int(size[1]))
    expected = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    if tuple(grid or (1, 1)) != expected:
        raise PrequantizedError(f"{path}: {scale_key} is {tuple(grid)}, not the {expected} blocks of {block} that "
                                f"{key} {shape} has; the checkpoint does not match its quantization_config")

    def read(s: Stored, rows: slice) -> torch.Tensor:
        weight = s.stored_read(key, rows)
        scale = s.stored_read(scale_key).reshape(expected)
        scale = scale[rows.start // block[0]: math.ceil(rows.stop / block[0])]
        return dequantize_fp8(weight, scale, block, rows.start)

    scale_dtype = from_safetensors(stored.stored_dtype(scale_key))
    pow2 = config.get("scale_fmt") == "ue8m0" or scale_dtype in (torch.uint8, getattr(torch, "float8_e8m0fnu", None))
    fp8 = FP8Blocks(from_safetensors(stored.stored_dtype(key)), scale_key, scale_dtype, tuple(grid), block, pow2)
    return DenseTensor(key, shape, dtype, (key, scale_key), read, fp8)


def _mxfp4_dense(key: str, stored: Stored, dtype: torch.dtype, path) -> DenseTensor:
    blocks_key, scales_key = key + "_blocks", key + "_scales"
    shape, grid = stored.stored_shape(blocks_key), stored.stored_shape(scales_key)
    if len(shape) != 4 or shape[-1] != 16 or tuple(grid) != tuple(shape[:-1]):
        raise PrequantizedError(f"{path}: {blocks_key} {shape} with {scales_key} {grid} is not gpt-oss's MXFP4 "
                                f"expert layout ((E, out, in/32, 16) and (E, out, in/32)); {_fix()}")
    experts, out, groups, _ = shape

    def read(s: Stored, rows: slice) -> torch.Tensor:  # rows: experts
        values = dequantize_mxfp4(s.stored_read(blocks_key, rows), s.stored_read(scales_key, rows))
        return values.transpose(1, 2)  # (E, out, in) -> the model's (E, in, out)

    return DenseTensor(key, (experts, groups * 32, out), dtype, (blocks_key, scales_key), read)


def _dense_dtype(config: dict) -> torch.dtype:
    """What the dense weights are read as: the checkpoint's declared dtype, bf16 where it declares none."""
    for name in ("dtype", "torch_dtype"):
        value = config.get(name)
        if isinstance(value, str):
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if dtype in FLOAT_DTYPES:
                return dtype
    return torch.bfloat16


@dataclass(frozen=True)
class DenseView:
    """What a model dir shows of a quantized checkpoint: the dense tensors by name, and the stored tensors they
    replace (the quantized parts and scales; an FP8 checkpoint's activation scales)."""

    tensors: dict[str, DenseTensor] = field(default_factory=dict)
    hidden: frozenset[str] = frozenset()


def dense_view(config: dict, stored: Stored, path) -> DenseView:
    """The :class:`DenseView` of a checkpoint (empty for an unquantized one).

    Raises:
        PrequantizedError: a method other than :data:`SUPPORTED`, an FP8 tensor without its scale, or a
            layout other than the method's.
    """
    method = quantization_method(config, path)
    keys = stored.stored_keys()
    present = set(keys)
    dtype = _dense_dtype(config)
    dense: dict[str, DenseTensor] = {}
    hidden: set[str] = set()
    if method == "fp8":
        quant = config["quantization_config"]
        dense = {k: _fp8_dense(k, stored, quant, dtype, path) for k in keys if k + "_scale_inv" in present}
        hidden = {k for k in keys if k.endswith(_ACTIVATION_SCALES)}
    elif method == "mxfp4":
        dense = {k.removesuffix("_blocks"): _mxfp4_dense(k.removesuffix("_blocks"), stored, dtype, path)
                 for k in keys if k.endswith("_blocks") and k.removesuffix("_blocks") + "_scales" in present}
    for key in keys:
        if stored.stored_dtype(key) in _FP8 and key not in dense:
            raise PrequantizedError(f"{path}: {key} is stored as {stored.stored_dtype(key)} without a scale "
                                    f"({key}_scale_inv); {_fix()}")
    hidden |= {p for d in dense.values() for p in d.parts} - set(dense)
    return DenseView(dense, frozenset(hidden))
