"""The merged export of a trained (possibly sharded) LoRA model.

:func:`export_merged` is called by every rank after training: each rank merges
the base rows it already holds with the replicated LoRA A/B, and
:func:`~lora_dist.export.writer.write_checkpoint` writes them. A finished run's
output dir (``lora-dist export RUN_DIR``) is exported by :func:`lora_dist.session.export_run`,
which rebuilds the run's model sharded as in training and calls :func:`export_merged`.
An adapted param the base stores transposed (Qwen3-VL-MoE's experts in the Hub layout)
is merged from the base files instead, its rows split over the ranks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from lora_dist.dtypes import from_safetensors, parse_dtype
from lora_dist.export.errors import ExportError
from lora_dist.export.layout import plan_layout
from lora_dist.export.params import ParamPart, param_parts, part_sources
from lora_dist.export.sources import (
    MERGED_FROM_KEY,
    QUANTIZED_DTYPE_KEY,
    QUANTIZED_KEY,
    QUANTIZED_WEIGHTS_KEY,
    FP8Merge,
    FP8Source,
    RowsSource,
    file_rows,
    merged_from,
    output_specs,
    param_source,
    stored_rows,
    stored_specs,
)
from lora_dist.export.target import check_output
from lora_dist.export.writer import MODES, write_checkpoint
from lora_dist.lora import LoRALayer, LoRAParam, lora_modules
from lora_dist.merge import LoRAWeights
from lora_dist.model_dir import ModelDir
from lora_dist.nf4 import is_quantized
from lora_dist.ranks import RankGroup
from lora_dist.sharding import full_shape, gathered, is_dtensor, local_dtype
from lora_dist.weight_mapping import WeightMap

__all__ = ["export_merged", "fp8_sources", "stores_fp8"]


#: Wrappers that keep the user's model as ``.module``.
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user model inside DDP / DeepSpeed engine / torch.compile wrappers."""
    while True:
        if type(model).__name__ in _WRAPPERS:
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _lora_weights(layers: Mapping[str, LoRALayer], lora: Mapping[str, torch.Tensor] | None
                  ) -> dict[str, LoRAWeights]:
    """Every layer's full A/B: from ``lora`` (``<layer>.lora_A.weight`` ...) where given, else copies of the
    params (collective: gathered if ZeRO-3 partitioned or DTensor-sharded)."""
    if lora is not None:
        missing = [f"{n}.{part}.weight" for n in layers for part in ("lora_A", "lora_B")
                   if f"{n}.{part}.weight" not in lora]
        if missing:
            raise ExportError(f"the LoRA tensors given have no {missing[0]}; pass every layer's lora_A and lora_B")
        return {name: dataclasses.replace(layer.lora_weights(), lora_A=lora[f"{name}.lora_A.weight"].detach(),
                                          lora_B=lora[f"{name}.lora_B.weight"].detach())
                for name, layer in layers.items()}
    params = [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    out = {}
    with gathered(params):
        for name, layer in layers.items():
            a, b = (p.full_tensor() if is_dtensor(p) else p for p in (layer.lora_A.weight, layer.lora_B.weight))
            out[name] = dataclasses.replace(layer.lora_weights(), lora_A=a.detach().clone(), lora_B=b.detach().clone())
    return out


def _on_host(lora: LoRAWeights) -> LoRAWeights:
    """``lora`` with A and B in host memory, where the base files' rows are merged (once, not per row block)."""
    return dataclasses.replace(lora, lora_A=lora.lora_A.cpu(), lora_B=lora.lora_B.cpu())


def _from_files(layer: LoRALayer, base_dtype: torch.dtype | None) -> bool:
    """The layer's base weight is merged from the base files, not from what the model holds: it holds the weight
    in another dtype than the run keeps its base in (DeepSpeed's bf16 mode casts a float32 base to bf16)."""
    weight = layer.base_weight()
    return (base_dtype is not None and not layer.merged and not is_quantized(weight)
            and local_dtype(weight) != base_dtype)


def _param_name(name: str, layer: LoRAParam) -> str:
    """``<owner>.lora.<parameter>`` -> ``<owner>.<parameter>``, the adapted param's own name."""
    return name[: -len(f"lora.{layer.parameter_name}")] + layer.parameter_name


def merge_targets(model: nn.Module, base: ModelDir, keys=None) -> tuple[dict, dict[str, str], WeightMap]:
    """Where each LoRA layer of ``model`` merges into ``base``'s tensors (``keys``: the names the export writes,
    default the base's): the adapted parameters' sources and the adapted linears' keys, by layer name, and the
    model's :class:`~lora_dist.weight_mapping.WeightMap`.

    Raises:
        ExportError: an adapted weight the base does not store as one tensor (a tied weight: GPT-2's or
            Qwen2-0.5B's ``lm_head``; one transformers assembles from several), or an adapted parameter of no
            base tensor of its shape.
    """
    keys = set(base.keys()) if keys is None else keys
    model = _unwrap(model)
    layers = dict(lora_modules(model))
    weights = WeightMap.of(base, model)
    sources = {}
    for name, layer in layers.items():
        if isinstance(layer, LoRAParam):
            shape = full_shape(layer.base_weight())
            source = weights.source(_param_name(name, layer), shape)
            if source is None or source.shape != shape:
                raise ExportError(f"{_param_name(name, layer)}: the base checkpoint {base.path} has no tensors of its "
                                  f"shape {shape}; base_path is not the checkpoint the model was loaded from")
            sources[name] = source
    linears = {name: weights.file_key(f"{name}.weight") for name, layer in layers.items()
               if not isinstance(layer, LoRAParam)}
    for name, key in linears.items():
        if key not in keys:
            raise ExportError(
                f"LoRA-adapted weight {name}.weight is not one tensor of the base checkpoint {base.path} (a tied "
                "weight, or one transformers assembles from several?); the merged export writes exactly the "
                "base's keys: leave that layer out of lora.target_modules"
            )
    return sources, linears, weights


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_path: str | os.PathLike | ModelDir,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    mode: str = "auto",
    what: str = "out_dir",
    lora: Mapping[str, torch.Tensor] | None = None,
    base_dtype: torch.dtype | None = None,
    keep_fp8: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Write the model with its LoRA merged in as a HF checkpoint dir. Collective: call on every rank.

    Works on a single process and on fsdp2 (``Shard(0)`` DTensors), zero3
    (DeepSpeed partitions) and ddp models; no rank materializes the model.

    Args:
        model: the trained model (a DDP / DeepSpeed engine wrapper is unwrapped).
        out_dir: the checkpoint dir to create; never the base, nor a dir containing or inside it.
        base_path: the base model dir the model was loaded from, as a path or the
            :class:`~lora_dist.model_dir.ModelDir` already opened: its key names,
            non-LoRA tensors, config, generation config and tokenizer files are used.
        dtype: dtype of the floating tensors written (the merge itself is fp32);
            None keeps the base checkpoint's dtypes. Every tensor must be finite in it.
        max_shard_size: largest file, decimal units like HF ("5GB" = 5e9 bytes).
        overwrite: replace an existing ``out_dir`` if it is a merged checkpoint
            lora_dist wrote (anything else is refused), once the new one is complete.
        mode: "auto", "shared" (every rank writes its bytes into files on a
            filesystem all ranks see) or "gather" (rank 0 collects and writes).
        what: how ``out_dir`` is named in errors (``--out`` for the CLI).
        lora: the full fp32 LoRA tensors by the model's names (``<layer>.lora_A.weight`` ...), e.g. an engine's
            ``lora_state_dict()``: merged in place of the params (which DeepSpeed's bf16 mode holds in bf16).
        base_dtype: the dtype the run keeps its base in (``model.dtype``). An adapted weight the model holds in
            another dtype (DeepSpeed's bf16 mode casts a float32 base to bf16) is merged from the base files
            instead, rows split over the ranks: the export is the same whatever the strategy.
        keep_fp8: a base stored as block-scaled FP8 is written as it is stored (:func:`fp8_sources`): every tensor
            copied byte for byte, the adapted FP8 weights (experts adapted through ``target_parameters`` too)
            merged and quantized again, ``quantization_config`` kept. False (or an NF4-trained model, or another
            quantization): every weight dense in ``dtype``.
        chat_template: the chat template training used (``data.chat_template``), written as ``chat_template.jinja``
            in place of the base's; None: the base's tokenizer files as they are.

    Returns:
        ``out_dir`` as an absolute path, on every rank.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False.
        OutputRefusedError: ``out_dir`` is, contains or lies inside the base, or
            exists and is not a merged checkpoint lora_dist wrote.
        ExportOverflowError: a tensor overflows ``dtype`` (fp16 above 65504); nothing is published.
        ExportError: a LoRA weight the base does not have, an unsupported
            sharding, no disk space, or a failure on another rank.
        MergeError: a merged weight with NaN/Inf (in fp32).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    group = RankGroup()
    model = _unwrap(model)
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # parameters back to their sharded DTensors, whatever the last forward left
    layers = dict(lora_modules(model))
    error = None
    try:
        out_dtype = parse_dtype(dtype)
        base = base_path if isinstance(base_path, ModelDir) else ModelDir(base_path)
        if group.rank == 0:  # before the collectives below: nothing is gathered for an output that is refused
            check_output(out_dir, [base.path], overwrite=overwrite, base_dir=base.path, what=what)
        if not layers:
            raise ExportError("the model has no LoRA layers; inject_lora() it, or copy the base checkpoint instead")
        keep_fp8 = keep_fp8 and stores_fp8(base) and not any(is_quantized(p) for p in model.parameters())
        specs = stored_specs(base, out_dtype) if keep_fp8 else output_specs(base, out_dtype)
        linears = {n: layer for n, layer in layers.items() if not isinstance(layer, LoRAParam)}
        params = {n: layer for n, layer in layers.items() if isinstance(layer, LoRAParam)}
        sources_of, keys, weights = merge_targets(model, base, specs)
    except Exception as e:
        error = e
    group.check(error)
    try:
        adapters = _lora_weights(layers, lora)
    except Exception as e:  # before the gathers, so the ranks stay in step: only a bad ``lora`` raises here
        adapters, error = {}, e
    group.check(error)
    try:
        read = stored_rows if keep_fp8 else file_rows
        from_fp8: dict[str, torch.dtype] = {}  # adapted layers merged from FP8 files: the dense dtype read there
        from_files = {name for name, layer in layers.items() if _from_files(layer, base_dtype)}
        sources: dict[str, object] = {k: RowsSource(read(base, k), s, None) for k, s in specs.items()}
        for name, layer in params.items():
            parts = param_parts(base, sources_of[name], adapters[name], _param_name(name, layer))
            for part in [p for p in parts if keep_fp8 and base.fp8_blocks(p.key) is not None]:
                sources.update(fp8_sources(base, part.key, specs, _on_host(part.lora)))  # an FP8 expert: from files
                from_fp8[name] = from_safetensors(base.dtype(part.key))
            parts = [p for p in parts if not (keep_fp8 and base.fp8_blocks(p.key) is not None)]
            if any(p.transposed for p in parts):  # stored transposed: the shard's elements are in another order
                if is_quantized(layer.base_weight()):
                    raise ExportError(
                        f"{parts[0].key}: the base checkpoint stores {_param_name(name, layer)} transposed and the "
                        "model holds it in NF4 (model.quantize), which cannot be merged from the base files; save "
                        "the adapter and merge it with lora-dist merge instead"
                    )
                from_files.add(name)  # the files hold the base the model was loaded from (merged in place or not)
            elif layer.merged:  # merged in place: the param already holds W0 + delta
                parts = [ParamPart(p.key, p.start, p.numel, None) for p in parts]
            if name in from_files:
                sources.update({p.key: RowsSource(file_rows(base, p.key), specs[p.key], _on_host(p.lora))
                                for p in parts})
            else:
                sources.update(part_sources(layer.base_weight(), parts, specs))
        for name, layer in linears.items():
            key = keys[name]
            if full_shape(layer.weight) != specs[key].shape:
                raise ExportError(
                    f"{key}: the model's weight is {full_shape(layer.weight)} but the base checkpoint's is "
                    f"{specs[key].shape}; base_path is not the checkpoint the model was loaded from"
                )
            if keep_fp8 and base.fp8_blocks(key) is not None:  # merged from the files (the adapter's own A/B)
                sources.update(fp8_sources(base, key, specs, _on_host(adapters[name])))
            elif name in from_files:
                sources[key] = RowsSource(file_rows(base, key), specs[key], _on_host(adapters[name]))
            else:  # a layer merged in place already holds W0 + delta
                sources[key] = param_source(layer.weight, specs[key], None if layer.merged else adapters[name])
        # model.quantize: the other quantized weights are written dequantized too, so the export is the model
        # the adapter was trained with (the offline merge reads the original weights instead).
        adapted = set(keys.values())
        quantized = [(weights.file_key(n), p) for n, p in model.named_parameters() if is_quantized(p)]
        for key, param in quantized:
            if key in specs and key not in adapted and full_shape(param) == specs[key].shape:
                sources[key] = param_source(param, specs[key], None)
        from_fp8.update({name: from_safetensors(base.dtype(keys[name])) for name in linears
                         if keep_fp8 and base.fp8_blocks(keys[name]) is not None})
        metadata = {"format": "pt", MERGED_FROM_KEY: merged_from(
            from_fp8[name] if name in from_fp8  # the base files' dense rows
            else torch.float32 if name in from_files else local_dtype(layer.base_weight())
            for name, layer in layers.items())}
        if quantized:
            metadata[QUANTIZED_KEY] = "nf4"
            metadata[QUANTIZED_WEIGHTS_KEY] = ",".join(n for n, _ in quantized if n in specs)
            metadata[QUANTIZED_DTYPE_KEY] = merged_from(local_dtype(p) for _, p in quantized)
        layout = plan_layout(list(specs.values()), max_shard_size, metadata)
    except Exception as e:
        error = e
    group.check(error)
    return write_checkpoint(group, out_dir, base, layout, sources, overwrite=overwrite, mode=mode,
                            config_dtype=out_dtype, what=what, chat_template=chat_template)


def stores_fp8(base: ModelDir) -> bool:
    """Whether the base stores weights as block-scaled FP8 (:mod:`lora_dist.prequantized`)."""
    return base.quantized and any(base.fp8_blocks(k) is not None for k in base.keys())


def fp8_sources(base: ModelDir, key: str, specs: Mapping[str, object], lora) -> dict[str, FP8Source]:
    """The two outputs of FP8 weight ``key`` merged with ``lora`` and stored again: its codes and its scales."""
    blocks = base.fp8_blocks(key)
    merge = FP8Merge(base, key, blocks, lora)
    return {key: FP8Source(merge, specs[key], "codes"), blocks.scale_key: FP8Source(merge, specs[blocks.scale_key],
                                                                                     "scales")}

