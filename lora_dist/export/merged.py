"""The merged export of a trained (possibly sharded) LoRA model, and of a finished run's output dir.

:func:`export_merged` is called by every rank after training: each rank merges
the base rows it already holds with the replicated LoRA A/B, and
:func:`~lora_dist.export.writer.write_checkpoint` writes them. :func:`export_run`
(``lora-dist export RUN_DIR``) rebuilds a finished run's model sharded as in
training, loads its LoRA weights and calls :func:`export_merged`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_dist.adapter import adapter_nf4_record, read_adapter
from lora_dist.atomic import recover
from lora_dist.config import ConfigError, config_from_dict
from lora_dist.dtypes import parse_dtype
from lora_dist.export.errors import ExportError
from lora_dist.ranks import RankGroup
from lora_dist.export.layout import plan_layout
from lora_dist.export.sources import (
    MERGED_FROM_KEY,
    QUANTIZED_DTYPE_KEY,
    QUANTIZED_KEY,
    QUANTIZED_WEIGHTS_KEY,
    RowsSource,
    file_rows,
    merged_from,
    output_specs,
    param_source,
)
from lora_dist.export.params import ParamPart, param_parts, part_sources, weight_map
from lora_dist.export.target import check_output
from lora_dist.export.writer import MODES, write_checkpoint
from lora_dist.launch import init_distributed, run_device
from lora_dist.lora import LoRALayer, LoRAParam, lora_modules
from lora_dist.merge import LoRAWeights
from lora_dist.model import load_model
from lora_dist.model_dir import ModelDir
from lora_dist.parallel.deepspeed import deepspeed_config
from lora_dist.parallel.sharding import full_shape, gathered, is_dtensor, local_dtype
from lora_dist.quant import is_quantized

__all__ = ["export_merged", "export_run"]


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


def _lora_weights(layers: Mapping[str, LoRALayer]) -> dict[str, LoRAWeights]:
    """Collective: full copies of every layer's A/B (gathered if ZeRO-3 partitioned or DTensor-sharded)."""
    params = [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    out = {}
    with gathered(params):
        for name, layer in layers.items():
            a, b = (p.full_tensor() if is_dtensor(p) else p for p in (layer.lora_A.weight, layer.lora_B.weight))
            out[name] = dataclasses.replace(layer.lora_weights(), lora_A=a.detach().clone(), lora_B=b.detach().clone())
    return out


def _param_name(name: str, layer: LoRAParam) -> str:
    """``<owner>.lora.<parameter>`` -> ``<owner>.<parameter>``, the adapted param's own name."""
    return name[: -len(f"lora.{layer.parameter_name}")] + layer.parameter_name


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
        specs = output_specs(base, out_dtype)
        linears = {n: layer for n, layer in layers.items() if not isinstance(layer, LoRAParam)}
        params = {n: layer for n, layer in layers.items() if isinstance(layer, LoRAParam)}
        sources_of = {}
        if params:
            weights = weight_map(base, model)
            for name, layer in params.items():
                source = weights.source(_param_name(name, layer))
                if source is None or source.shape != full_shape(layer.base_weight()):
                    raise ExportError(
                        f"{_param_name(name, layer)}: the base checkpoint {base.path} has no tensors of its shape "
                        f"{full_shape(layer.base_weight())}; base_path is not the checkpoint the model was loaded from"
                    )
                sources_of[name] = source
        for name in linears:
            if f"{name}.weight" not in specs:
                raise ExportError(
                    f"LoRA-adapted weight {name}.weight is not a tensor of the base checkpoint {base.path} "
                    "(a tied or renamed weight?); the merged export writes exactly the base's keys"
                )
    except Exception as e:
        error = e
    group.check(error)
    adapters = _lora_weights(layers)
    try:
        sources: dict[str, object] = {k: RowsSource(file_rows(base, k), s, None) for k, s in specs.items()}
        for name, layer in params.items():
            parts = param_parts(base, sources_of[name], adapters[name], _param_name(name, layer))
            if layer.merged:  # merged in place: the param already holds W0 + delta
                parts = [ParamPart(p.key, p.start, p.numel, None) for p in parts]
            sources.update(part_sources(layer.base_weight(), parts, specs))
        for name, layer in linears.items():
            key = f"{name}.weight"
            if full_shape(layer.weight) != specs[key].shape:
                raise ExportError(
                    f"{key}: the model's weight is {full_shape(layer.weight)} but the base checkpoint's is "
                    f"{specs[key].shape}; base_path is not the checkpoint the model was loaded from"
                )
            # A layer merged in place already holds W0 + delta.
            sources[key] = param_source(layer.weight, specs[key], None if layer.merged else adapters[name])
        # model.quantize: the other quantized weights are written dequantized too, so the export is the model
        # the adapter was trained with (the offline merge reads the original weights instead).
        adapted = {f"{name}.weight" for name in linears}
        quantized = [(n, p) for n, p in model.named_parameters() if is_quantized(p)]
        for name, param in quantized:
            if name in specs and name not in adapted and full_shape(param) == specs[name].shape:
                sources[name] = param_source(param, specs[name], None)
        metadata = {"format": "pt", MERGED_FROM_KEY: merged_from(local_dtype(layer.base_weight())
                                                                  for layer in layers.values())}
        if quantized:
            metadata[QUANTIZED_KEY] = "nf4"
            metadata[QUANTIZED_WEIGHTS_KEY] = ",".join(n for n, _ in quantized if n in specs)
            metadata[QUANTIZED_DTYPE_KEY] = merged_from(local_dtype(p) for _, p in quantized)
        layout = plan_layout(list(specs.values()), max_shard_size, metadata)
    except Exception as e:
        error = e
    group.check(error)
    return write_checkpoint(group, out_dir, base, layout, sources, overwrite=overwrite, mode=mode,
                            config_dtype=out_dtype, what=what)


# ----------------------------------------------------------------------------- lora-dist export RUN_DIR


def _run_weights(run: Path) -> Path:
    """Where the run's LoRA weights are: its final adapter dir, or its latest checkpoint dir."""
    recover(run / "adapter", cleanup=False)  # a writer killed mid-publish may have left it aside
    if (run / "adapter").is_dir():
        return run / "adapter"
    latest = run / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if not re.fullmatch(r"step-\d+", name):
            raise ConfigError(f"{latest} names {name[:80]!r}, not a checkpoint (step-NNNNNN); the run dir is damaged")
        return run / "checkpoints" / name
    raise ConfigError(f"{run} has neither adapter/ nor checkpoints/latest; is it a lora-dist output.dir?")


def _run_lora_tensors(weights: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors in :func:`_run_weights`' dir, by ``model``'s names."""
    if weights.name == "adapter":
        return read_adapter(weights).model_tensors(model)
    return load_file(str(weights / "lora.safetensors"))


def _run_nf4_record(weights: Path):
    """The NF4 weights the run recorded beside its LoRA weights (:func:`_run_weights`); None where it recorded none
    (an older run: the export quantizes what its sharding can)."""
    from lora_dist.checkpoint import nf4_record_of, read_state

    return adapter_nf4_record(weights) if weights.name == "adapter" else nf4_record_of(read_state(weights))


def export_run(run_dir: str | Path, out: str | Path | None = None, dtype: str | None = None,
               max_shard_size: str | None = None, overwrite: bool = False) -> Path:
    """Write ``RUN_DIR/merged`` (or ``out``) from a finished run; call on every rank.

    Run it under the same launcher as training (``torchrun``, ``srun``,
    ``mpirun``): the base is rebuilt sharded across the ranks exactly as in
    training, the run's LoRA weights are loaded on every rank, and each rank
    merges the shards it owns (:func:`export_merged`). As one process it
    streams base + adapter from disk (:func:`~lora_dist.export.offline.merge_offline`),
    and never loads the base onto a GPU.

    Args:
        run_dir: a run's ``output.dir`` (holds ``config.json`` and ``adapter/``
            or ``checkpoints/``).
        out: the checkpoint dir to create; default ``RUN_DIR/merged``. Never the base, the run's
            ``adapter/``, ``checkpoints/`` or ``config.json``, nor a dir containing or inside one of them.
        dtype: dtype of the floating tensors written; default the run's ``export.dtype``.
        max_shard_size: largest file; default the run's ``export.max_shard_size``.
        overwrite: replace an existing output that is a merged checkpoint lora_dist wrote (also when the
            run's ``output.overwrite`` is set); anything else there is refused.

    Returns:
        The checkpoint dir, as an absolute path.

    Raises:
        ConfigError: ``run_dir`` is not a lora-dist output dir, or its adapter does not fit its config.
        OutputExistsError, ExportError, MergeError: as for :func:`export_merged`.
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"{run}/config.json not found; RUN_DIR must be a lora-dist output.dir")
    try:
        cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{run}/config.json is not valid JSON ({e}); RUN_DIR must be a lora-dist output.dir") from None
    env = init_distributed(cfg.parallel.timeout_s)
    out_dir = Path(out) if out else run / "merged"
    out_dtype = parse_dtype(dtype or cfg.export.dtype)
    shard_size = max_shard_size or cfg.export.max_shard_size
    overwrite = overwrite or cfg.output.overwrite
    inputs = [cfg.model.path, run / "adapter", run / "checkpoints", run / "config.json"]
    # Before any work (the model load below): an output the export may not write is refused on every rank.
    RankGroup().on_rank0(lambda: check_output(out_dir, inputs, overwrite=overwrite, base_dir=cfg.model.path,
                                              what="--out"))
    weights = _run_weights(run)  # before any model is built: a run dir with no LoRA weights is refused at once
    # An NF4 run (model.quantize) is exported from its quantized model on any number of ranks: the merge is
    # into the dequantized base it was trained on, not into the original weights merge_offline reads.
    if env.world_size == 1 and weights.name == "adapter" and not cfg.model.quantize:
        # One process: stream base + adapter tensor by tensor from disk; nothing is loaded whole.
        from lora_dist.export.offline import merge_offline

        return merge_offline(cfg.model.path, run / "adapter", out_dir, max_shard_size=shard_size, dtype=out_dtype,
                             overwrite=overwrite)
    parallel = cfg.parallel
    if env.world_size > 1 and parallel.strategy in ("none", "auto"):  # shard the base for the export
        parallel.strategy = "fsdp2"
    if env.world_size == 1:
        parallel.strategy = "none"
    parallel.dp_replicate = parallel.dp_shard = 0  # the export's own ranks: the base sharded over all of them
    parallel.reshard_after_forward = True
    # One process holds the whole base: host memory, never one GPU's.
    device = run_device() if env.world_size > 1 else torch.device("cpu")
    base = ModelDir(cfg.model.path)
    ds = deepspeed_config(cfg, base.hf_config) if parallel.strategy.startswith("zero") else None
    # The weights the run stored as NF4 depend on its sharding: quantize those, whatever this export's ranks.
    only = _run_nf4_record(weights) if cfg.model.quantize else None
    model = load_model(cfg.model, cfg.lora, parallel, device, cfg.train.seed, ds, base=base, quantize_only=only).model
    tensors = _run_lora_tensors(weights, model)
    with torch.no_grad():
        for name, layer in lora_modules(model):
            for part in ("lora_A", "lora_B"):
                key = f"{name}.{part}.weight"
                if key not in tensors:
                    raise ConfigError(f"{run}: no {key}; the run's adapter does not match its config")
                weight = getattr(layer, part).weight
                if tensors[key].shape != weight.shape:
                    raise ConfigError(f"{run}: {key} is {tuple(tensors[key].shape)} in the run's adapter but "
                                      f"{tuple(weight.shape)} in the model its config builds; was config.json edited?")
                weight.copy_(tensors[key])
    return export_merged(model, out_dir, base, dtype=out_dtype, max_shard_size=shard_size, overwrite=overwrite,
                         what="--out")
