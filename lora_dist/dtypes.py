"""The one dtype table: names users write, names safetensors stores, and the torch dtypes behind both; and the
check that a tensor's values are finite in its dtype (:func:`all_finite`)."""

from __future__ import annotations

import torch

from lora_dist.errors import UserError

__all__ = ["FLOAT_DTYPES", "FP8_DTYPES", "DTypeError", "all_finite", "dtype_name", "from_safetensors", "parse_dtype",
           "to_safetensors"]

#: Floating dtypes a checkpoint may hold and lora_dist may write.
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: The FP8 dtypes a block-scaled FP8 checkpoint stores its weights in (:mod:`lora_dist.prequantized`).
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

#: What a user may write (config ``model.dtype``/``export.dtype``, ``--dtype``), lower-case.
_USER_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

_SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                     ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS[_name] = getattr(torch, _attr)
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS.items()}


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a floating tensor ``t`` is finite: exactly when its smallest and largest are
    (``aminmax`` propagates a NaN, and an Inf is the largest or the smallest value). One reduction and no
    temporary the size of ``t`` (``isfinite(t).all()`` allocates a bool tensor as large, and more), about 15x
    faster on a CPU."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class DTypeError(UserError, ValueError):
    """A dtype name lora_dist does not know, or a dtype safetensors cannot store."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch dtype from a user's name (``bf16``, ``bfloat16``, ``torch.float16``, ...).

    None, ``"auto"`` and ``"none"`` mean "keep the source's dtypes" and give None.

    Raises:
        DTypeError: not one of bf16, fp16, fp32.
    """
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES:
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name in ("auto", "none", ""):
            return None
        if name in _USER_NAMES:
            return _USER_NAMES[name]
    raise DTypeError(f"dtype {dtype!r} is not one of bf16, fp16, fp32 (or None to keep the base's dtypes)")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as HF's ``config.json`` writes it."""
    return str(dtype).removeprefix("torch.")


def to_safetensors(dtype: torch.dtype) -> str:
    """The safetensors header name of ``dtype`` (``"BF16"``)."""
    if dtype not in _SAFETENSORS_NAMES:
        raise DTypeError(f"dtype {dtype} cannot be stored in safetensors")
    return _SAFETENSORS_NAMES[dtype]


def from_safetensors(name: str) -> torch.dtype:
    """The torch dtype of a safetensors header name."""
    if name not in _SAFETENSORS:
        raise DTypeError(f"unknown safetensors dtype {name!r}")
    return _SAFETENSORS[name]
