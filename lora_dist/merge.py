"""LoRA merge math as pure functions over tensors.

Every merge in lora_dist goes through this module: the in-module
``LoRALinear.merge()``, the distributed export (each rank merging the rows it
owns) and the offline streaming merge. The update is always computed in fp32
and checked for NaN/Inf before and after it is cast to the output dtype (an
fp16 cast can overflow to Inf). Only floating-point weights and adapters merge:
an integer (quantized) tensor would make the merge a silent no-op or garbage.

Shapes follow PEFT: ``lora_A`` is ``(r, in_features)`` and ``lora_B`` is
``(out_features, r)``. A base weight is ``(out, in)`` for ``nn.Linear`` and
``(in, out)`` for GPT-2's ``Conv1D`` (``fan_in_fan_out=True``).

An adapter on a stack of ``E`` experts (PEFT's ``target_parameters`` on a fused
``(E, out, in)`` param, or ``(E, in, out)`` with ``fan_in_fan_out``) keeps
PEFT's layout: ``lora_A`` is ``(E * r, in)`` with expert ``e``'s rows at
``[e * r, (e + 1) * r)``, and ``lora_B`` is ``(out, r * E)`` with expert ``e``'s
columns at ``e, e + E, e + 2E, ...``. Its merge takes the whole ``(E', out, in)``
stack (``rows`` then selects experts) and checks every dim, so a stack stored
transposed is refused, not added element-wise into the wrong places (only the
in-place merge of the param the adapter was built on passes it as ``(E, out * in)``).
:func:`lora_rows` cuts one expert's rows out as a plain adapter (for a
checkpoint that stores experts one by one, or a merge a block of rows at a time).

``B @ A`` runs in full fp32 (IEEE) whatever the process set for fp32 matmuls:
TF32 (``torch.backends.cuda.matmul.allow_tf32``, ``set_float32_matmul_precision
("high")``, which ``TrainingArguments(tf32=True)`` sets) or oneDNN's bf16 is
turned off around it and restored (:func:`full_fp32_matmul`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from lora_dist.dtypes import all_finite
from lora_dist.errors import UserError

__all__ = [
    "LoRAWeights",
    "MergeError",
    "adapter_shape",
    "full_fp32_matmul",
    "lora_rows",
    "lora_delta",
    "lora_scale",
    "merge_state_dict",
    "merge_weight",
    "unmerge_weight",
]


class MergeError(UserError, ValueError):
    """A merge would produce a wrong or non-finite weight."""


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA scaling factor: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if r <= 0:
        raise MergeError(f"LoRA rank must be positive, got r={r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass(frozen=True)
class LoRAWeights:
    """The adapter of one layer: ``delta_W = scale * lora_B @ lora_A``."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False
    num_experts: int = 0
    """0 for one weight; ``E`` for a stack of experts in PEFT's layout (see the module docstring)."""

    @property
    def r(self) -> int:
        return self.lora_A.shape[0] // max(self.num_experts, 1)


def _expert_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(E * r, in)`` / ``(out, r * E)`` as per-expert ``(E, r, in)`` / ``(E, out, r)``."""
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] % num_experts:
        raise MergeError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not (E*r, in) and "
                         f"(out, r*E) for E={num_experts} experts")
    a = lora_A.reshape(num_experts, -1, lora_A.shape[1])
    b = lora_B.reshape(lora_B.shape[0], -1, num_experts).permute(2, 0, 1)
    return a, b


def lora_rows(lora: LoRAWeights, rows: slice, expert: int | None = None) -> LoRAWeights:
    """The plain adapter of rows ``rows`` of a weight, or of one expert's weight in a stacked adapter.

    A checkpoint that stores a fused param in pieces (an expert's gate and up projections)
    merges each piece with this: its delta is exactly those rows of the param's delta.

    Args:
        lora: the adapter; stacked (``num_experts`` > 0) when ``expert`` is given.
        rows: rows of the (expert's) weight: ``out`` rows, or ``in`` rows with ``fan_in_fan_out``.
        expert: which expert of a stacked adapter; None for a plain one.

    Returns:
        A plain (``num_experts=0``) adapter whose delta is ``delta[rows]`` (of that expert).
    """
    a, b = lora.lora_A, lora.lora_B
    if expert is not None:
        stacked_a, stacked_b = _expert_factors(a, b, lora.num_experts)
        a, b = stacked_a[expert], stacked_b[expert]
    if lora.fan_in_fan_out:  # the weight's rows index A's columns
        return LoRAWeights(a[:, rows], b, lora.scale, True)
    return LoRAWeights(a, b[rows], lora.scale, False)


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in full IEEE precision inside (CUDA's and oneDNN's), the process's settings restored after.

    torch's per-backend ``fp32_precision`` is set and restored, which keeps whichever API the process used
    (``allow_tf32``, ``set_float32_matmul_precision`` or ``fp32_precision``) reading what it set.
    """
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    if all(v == "ieee" for v in saved):
        yield
        return
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, v in zip(backends, saved):
            b.fp32_precision = v


def lora_delta(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
    rows: slice | None = None,
    num_experts: int = 0,
) -> torch.Tensor:
    """The fp32 weight update ``scale * B @ A`` laid out like the base weight (full fp32 matmul, no TF32).

    Args:
        lora_A: ``(r, in_features)``, or ``(E * r, in_features)`` for experts.
        lora_B: ``(out_features, r)``, or ``(out_features, r * E)`` for experts.
        scale: the LoRA scaling factor.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``, transposed experts).
        rows: only these rows of the base weight's layout (a dim-0 shard); for experts, these experts.
        num_experts: 0 for one weight; ``E`` for a stack ``(E, out, in)``.

    Returns:
        An fp32 tensor shaped like ``weight[rows]``.
    """
    if num_experts:
        a, b = _expert_factors(lora_A, lora_B, num_experts)
        chosen = range(num_experts)[rows if rows is not None else slice(None)]
        deltas = [lora_delta(a[e], b[e], scale, fan_in_fan_out) for e in chosen]
        empty = (0, a.shape[2], b.shape[1]) if fan_in_fan_out else (0, b.shape[1], a.shape[2])
        return torch.stack(deltas) if deltas else a.new_zeros(empty, dtype=torch.float32)
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise MergeError(
            f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not (r, in) and (out, r)"
        )
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
        raise MergeError(f"lora_A/lora_B are {lora_A.dtype}/{lora_B.dtype}; LoRA tensors must be floating point "
                         "(a quantized adapter cannot be merged; dequantize it first)")
    a = lora_A.detach().to(torch.float32)
    b = lora_B.detach().to(torch.float32)
    rows = rows if rows is not None else slice(None)
    with full_fp32_matmul():
        if fan_in_fan_out:
            # weight is (in, out) = (B @ A).T; its rows index A's columns.
            return (a[:, rows].T @ b.T) * scale
        return (b[rows] @ a) * scale


def adapter_shape(lora: LoRAWeights) -> tuple[int, ...]:
    """The shape of the weight ``lora`` adapts: ``(out, in)``, ``(in, out)`` with ``fan_in_fan_out``, and
    ``(E, ...)`` of those for a stack of experts."""
    out_f, in_f = lora.lora_B.shape[0], lora.lora_A.shape[1]
    shape = (in_f, out_f) if lora.fan_in_fan_out else (out_f, in_f)
    return (lora.num_experts, *shape) if lora.num_experts else shape


def _expected_shape(w: LoRAWeights, rows: slice | None, flat: bool = False) -> tuple[int, ...]:
    shape = adapter_shape(w)
    if flat:  # a stack seen as (E, out * in)
        shape = (shape[0], shape[1] * shape[2])
    if rows is None:
        return shape
    return (len(range(*rows.indices(shape[0]))), *shape[1:])


def merge_weight(
    weight: torch.Tensor,
    lora: LoRAWeights,
    rows: slice | None = None,
    out_dtype: torch.dtype | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """``weight + scale * B @ A`` computed in fp32, checked finite, cast to ``out_dtype``.

    Args:
        weight: the base weight, or the rows ``rows`` of it (a dim-0 shard); for a stack of experts, the
            ``(E', out, in)`` experts ``rows`` (every dim checked), or the param the adapter was built on seen as
            ``(E', out * in)`` (the in-place merge: its layout is the adapter's).
        lora: the layer's adapter.
        rows: which rows of the full weight ``weight`` holds; ``None`` for all.
        out_dtype: result dtype; defaults to ``weight.dtype``.
        name: used in error messages.

    Raises:
        MergeError: on a shape mismatch, a non-float weight or output dtype, or a result
            that is not finite in fp32 or in ``out_dtype``.
    """
    out_dtype = out_dtype or weight.dtype
    if not (weight.is_floating_point() and out_dtype.is_floating_point):
        raise MergeError(f"{name}: cannot merge into a {weight.dtype} weight as {out_dtype}; the base weight and "
                         "the output must be floating point (use the unquantized checkpoint)")
    expected = _expected_shape(lora, rows, flat=bool(lora.num_experts) and weight.dim() == 2)
    if tuple(weight.shape) != expected:
        raise MergeError(
            f"{name}: base shape {tuple(weight.shape)} does not match the adapter's {expected}; "
            "the adapter was trained for a different base model"
        )
    merged = weight.detach().to(torch.float32) + lora_delta(
        lora.lora_A, lora.lora_B, lora.scale, lora.fan_in_fan_out, rows, lora.num_experts
    ).view(weight.shape)
    if not all_finite(merged):
        raise MergeError(f"{name}: merged weight has NaN/Inf; the adapter or base weight is corrupt")
    result = merged.to(out_dtype)
    if not all_finite(result):
        dtype = str(out_dtype).removeprefix("torch.")
        raise MergeError(f"{name}: the merged weight overflows {dtype} (Inf after the cast); "
                         "merge to float32 or bfloat16 instead")
    return result


def unmerge_weight(
    weight: torch.Tensor, lora: LoRAWeights, out_dtype: torch.dtype | None = None, name: str = "weight"
) -> torch.Tensor:
    """Inverse of :func:`merge_weight`: ``weight - scale * B @ A`` in fp32."""
    negated = LoRAWeights(lora.lora_A, lora.lora_B, -lora.scale, lora.fan_in_fan_out, lora.num_experts)
    return merge_weight(weight, negated, out_dtype=out_dtype, name=name)


def merge_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    adapters: Mapping[str, LoRAWeights],
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Merge adapters into a base state dict.

    Args:
        state_dict: base tensors by name (``model.layers.0.self_attn.q_proj.weight``).
        adapters: adapters by module name (``model.layers.0.self_attn.q_proj``).
        out_dtype: dtype of floating-point outputs; defaults to each tensor's own.

    Returns:
        A new dict with the same keys; targeted weights merged.

    Raises:
        MergeError: an adapter names a module whose weight is not in ``state_dict``.
    """
    missing = [m for m in adapters if f"{m}.weight" not in state_dict]
    if missing:
        raise MergeError(f"adapter targets modules missing from the base: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in adapters:
            out[key] = merge_weight(tensor, adapters[module], out_dtype=out_dtype, name=key)
        elif out_dtype is not None and tensor.is_floating_point():
            out[key] = tensor.to(out_dtype)
        else:
            out[key] = tensor
    return out
