"""The checkpoint tensors of an adapted parameter, each merged with its own part of the adapter.

A parameter adapter (``lora.target_parameters``) updates a model param that the
checkpoint may store in pieces: transformers fuses Mixtral's per-expert ``w1``/``w3``
tensors into one ``(E, 2I, H)`` ``gate_up_proj`` and its ``w2`` s into ``down_proj``
(:mod:`lora_dist.weight_mapping`). The merged export writes the checkpoint's own
tensors, so each piece gets the rows of its expert's delta that it holds
(:func:`lora_dist.merge.lora_rows`): the inverse of the conversion, applied to the delta.
A piece is then merged like any adapted weight, from the base files
(:func:`checkpoint_loras`, the offline merge and verify) or from the rank's shard of the
fused param (:func:`part_sources`, the export at the end of training). A tensor stored
transposed from the param (Qwen3-VL-MoE's Hub layout of its experts) is one part whose
adapter is the transpose (``fan_in_fan_out`` flipped); the export merges it from the base
files, as its elements are not in the param's order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from lora_dist.adapter import AdapterFile
from lora_dist.export.errors import ExportError
from lora_dist.export.layout import TensorSpec
from lora_dist.export.sources import RowsSource, ShardSource
from lora_dist.merge import LoRAWeights, lora_rows
from lora_dist.model_dir import ModelDir, skeleton
from lora_dist.sharding import ShardingError, owned_range, whole_local
from lora_dist.weight_mapping import TensorSource, Transposed, WeightMap

__all__ = ["ParamPart", "checkpoint_loras", "param_parts", "part_sources"]


@dataclass(frozen=True)
class ParamPart:
    """Checkpoint tensor ``key`` is flat elements ``[start, start + numel)`` of an adapted model param;
    ``lora`` is its own adapter (its delta is shaped like ``key``). ``transposed``: ``key`` is the whole param
    with its last two dims swapped (``start`` 0): not the param's elements in order."""

    key: str
    start: int
    numel: int
    lora: LoRAWeights | None
    transposed: bool = False


def param_parts(base: ModelDir, source: TensorSource, lora: LoRAWeights, name: str) -> list[ParamPart]:
    """The checkpoint tensors model param ``name`` is read from, each with its rows of ``lora``.

    Raises:
        ExportError: a tensor that is not whole rows of one expert (or of the weight), in one piece.
    """
    shape = source.shape
    if isinstance(source, Transposed):  # the last two dims swapped (weight_mapping allows no other transpose)
        flipped = dataclasses.replace(lora, fan_in_fan_out=not lora.fan_in_fan_out)
        return [ParamPart(source.keys()[0], 0, source.numel, flipped, transposed=True)]
    runs: dict[str, list] = {}
    for run in source.runs():
        runs.setdefault(run.key, []).append(run)
    row = shape[-1]
    expert = math.prod(shape[1:]) if lora.num_experts else math.prod(shape)
    parts = []
    for key, pieces in runs.items():
        key_shape = base.shape(key)
        run = pieces[0] if len(pieces) == 1 else None
        if run is not None and run.numel == source.numel:  # stored as the model holds it
            parts.append(ParamPart(key, 0, run.numel, lora))
            continue
        within = run.start % expert if run is not None else 0
        if (run is None or run.key_start or len(key_shape) != 2 or key_shape[-1] != row or within % row
                or within + run.numel > expert):
            raise ExportError(f"{key}: the checkpoint stores part of {name} {shape} in a way lora_dist cannot merge "
                              "a LoRA into (not whole rows of one expert); merge with PEFT's merge_and_unload instead")
        rows = slice(within // row, (within + run.numel) // row)
        piece = lora_rows(lora, rows, run.start // expert) if lora.num_experts else lora_rows(lora, rows)
        parts.append(ParamPart(key, run.start, run.numel, piece))
    return parts


def checkpoint_loras(base: ModelDir, adapter: AdapterFile) -> dict[str, LoRAWeights]:
    """Each checkpoint tensor an adapter changes -> its own adapter (for merges streamed from the files).

    Raises:
        ExportError: an adapted parameter the checkpoint has no tensors for, or stores in pieces
            that are not whole rows of one expert.
        AdapterError: the adapter does not fit the base's model.
    """
    if not adapter.lora_config.target_parameters:
        loras = {f"{m}.weight": w for m, w in adapter.weights().items()}
        if all(k in base for k in loras):  # stored under the model's own names: no model needed
            return loras
    model = skeleton(base)
    params = adapter.parameters(model) if adapter.lora_config.target_parameters else set()
    weights = WeightMap.of(base, model)
    out = {}
    for name, lora in adapter.weights(model).items():
        if name not in params:  # a linear layer: its weight, renamed as the checkpoint stores it
            out[weights.file_key(f"{name}.weight") or f"{name}.weight"] = lora
            continue
        source = weights.source(name)
        if source is None:
            raise ExportError(f"{name}: the adapter adapts this parameter, but {base.path} has no tensor for it")
        out.update((part.key, part.lora) for part in param_parts(base, source, lora, name))
    return out


def part_sources(param: torch.Tensor, parts: list[ParamPart], specs: dict[str, TensorSpec]
                 ) -> dict[str, RowsSource | ShardSource]:
    """What this rank writes of each checkpoint tensor of a (possibly sharded) adapted param: the part of
    its own shard (an FSDP2 row block or ZeRO-3 partition of the fused param) that falls in the tensor.

    Raises:
        ExportError: a sharding :func:`~lora_dist.sharding.owned_range` does not cover.
    """
    try:
        owned = owned_range(param)
    except ShardingError as e:
        raise ExportError(f"{parts[0].key}: {e}") from None
    out: dict[str, RowsSource | ShardSource] = {}
    if owned is None:
        flat = whole_local(param).detach().reshape(-1)
        for part in parts:
            spec = specs[part.key]
            row = math.prod(spec.shape[1:])
            out[part.key] = RowsSource(lambda a, b, s=part.start, n=row: flat[s + a * n: s + b * n].reshape(b - a, n),
                                       spec, part.lora)
        return out
    owned = owned.written()  # hybrid sharding: one replica group writes
    for part in parts:
        a, b = max(owned.start, part.start), min(owned.end, part.start + part.numel)
        local = owned.local.detach()[a - owned.start: b - owned.start] if a < b else owned.local[:0]
        a, b = (a, b) if a < b else (part.start, part.start)
        out[part.key] = ShardSource(local, a - part.start, b - part.start, specs[part.key], part.lora)
    return out
