"""Building a LoRA model from a local HF checkpoint, in the documented setup order.

    build skeleton on meta -> inject LoRA -> parallelize -> materialize
    -> each rank loads only the base tensors (or rows/slices) it owns
    -> initialize LoRA identically on every rank -> assert nothing is on meta

No rank ever reads or holds the whole base model: under fsdp2 a rank reads
the rows of each weight its ``Shard(0)`` DTensor owns; under zero3 the model
is built under ``deepspeed.zero.Init`` (partitioned as each module is created)
and a rank reads the flat element range of its partition.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist.config import ModelConfig, ParallelConfig
from lora_dist.model_dir import ModelDirError, ModelDir
from lora_dist.lora import InjectionReport, LoRAConfig, inject_lora, lora_modules, lora_parameters
from lora_dist.parallel import parallelize

__all__ = ["LoadedModel", "load_model", "torch_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass
class LoadedModel:
    model: nn.Module
    report: InjectionReport
    checkpoint: ModelDir
    ds_config: dict | None = None


def _model_class(hf_config):
    import transformers as tf

    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return tf.AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in archs):
        return tf.AutoModelForMaskedLM
    return tf.AutoModelForCausalLM


def _checkpoint_key(name: str, ckpt: ModelDir, prefix: str) -> str | None:
    if name in ckpt:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in ckpt:
        return name[len(prefix) + 1 :]
    if prefix and f"{prefix}.{name}" in ckpt:
        return f"{prefix}.{name}"
    return None


def _owned_rows(param: torch.Tensor) -> slice | None:
    """Rows of the full tensor held locally by a ``Shard(0)`` DTensor (``None`` for a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    start = offset[0] if param.dim() else 0
    return slice(start, start + (local_shape[0] if param.dim() else 1))


@torch.no_grad()
def _load_base(model: nn.Module, ckpt: ModelDir, dtype: torch.dtype) -> None:
    """Copy each base param's owned part from the checkpoint into the model."""
    prefix = getattr(model, "base_model_prefix", "")
    lora = {id(p) for p in lora_parameters(model)}
    missing = []
    for name, param in model.named_parameters():
        if id(param) in lora:
            continue
        key = _checkpoint_key(name, ckpt, prefix)
        if key is None:
            missing.append(name)
            continue
        full_shape = tuple(getattr(param, "ds_shape", param.shape))
        if ckpt.shape(key) != full_shape:
            raise ModelDirError(
                f"{key}: checkpoint shape {ckpt.shape(key)} != model shape {full_shape}; config.json and weights disagree"
            )
        if hasattr(param, "ds_tensor"):  # ZeRO-3 partition: a flat element range
            part = param.ds_tensor
            start = dist.get_rank() * part.numel()
            end = min(start + part.numel(), param.ds_numel)
            if end > start:
                part[: end - start].copy_(ckpt.read_flat(key, start, end).to(part.dtype))
            continue
        rows = _owned_rows(param)
        local = param.to_local() if rows is not None else param.data
        if local.numel() == 0:
            continue
        local.copy_(ckpt.read(key, rows).to(local.dtype))
    if missing:
        raise ModelDirError(f"{ckpt.path}: no weights for {missing[:5]}; the checkpoint does not match its config.json")
    for name, buf in model.named_buffers():
        key = _checkpoint_key(name, ckpt, prefix)
        if key is not None and tuple(buf.shape) == ckpt.shape(key):
            buf.copy_(ckpt.read(key).to(buf.dtype))


def _tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """``(owner, alias)`` names of parameters shared between modules (tied embeddings)."""
    first: dict[int, str] = {}
    ties = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties.append((first[id(param)], name))
        else:
            first[id(param)] = name
    return ties


def _no_init_weights():
    """Skip random init of weights that are about to be loaded."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _init_lora(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, module in lora_modules(model):
        module.initialize_parameters(generator)


def _assert_materialized(model: nn.Module) -> None:
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    on_meta += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if on_meta:
        raise RuntimeError(f"left on the meta device after loading: {on_meta[:5]}")


def load_model(
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    parallel_cfg: ParallelConfig,
    device: torch.device,
    seed: int,
    ds_config: dict | None = None,
) -> LoadedModel:
    """Build the LoRA model for ``parallel_cfg.strategy`` in the documented setup order.

    Args:
        model_cfg: ``model.path`` (local HF dir) and the base dtype.
        lora_cfg: what to adapt.
        parallel_cfg: strategy and its options.
        device: this rank's device.
        seed: LoRA init seed (the same on every rank).
        ds_config: DeepSpeed config, for ``zero*`` strategies.

    Raises:
        ModelDirError: missing/corrupt checkpoint or weights that do not fit the config.
    """
    import transformers as tf
    from accelerate import init_empty_weights

    ckpt = ModelDir(model_cfg.path)
    hf_config = tf.AutoConfig.from_pretrained(model_cfg.path)
    dtype = torch_dtype(model_cfg.dtype)
    cls = _model_class(hf_config)
    strategy = parallel_cfg.strategy
    if strategy == "zero3":
        import deepspeed

        # Parameters are partitioned as each module is created: no rank builds the whole model.
        # The dtype comes from the DeepSpeed config's bf16/fp16 sections (an explicit dtype is
        # ignored by DeepSpeed on accelerators without fp16 support).
        with deepspeed.zero.Init(config_dict_or_path=ds_config), _no_init_weights():
            model = cls.from_config(hf_config, dtype=dtype)
    else:
        # Parameters on meta, buffers (rotary tables, position ids) real.
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(hf_config, dtype=dtype)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # tied embeddings share one parameter (checkpoints store it once)
    report = inject_lora(model, lora_cfg)
    if strategy != "zero3":
        parallelize(model, parallel_cfg, device)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        ties = _tied_parameters(model)
        model.to_empty(device=device)
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
        for owner, alias in ties:  # to_empty gives each module its own tensor: tie them again
            module_name, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(module_name), attr, model.get_parameter(owner))
    elif parallel_cfg.activation_checkpointing:
        parallelize(model, parallel_cfg, device)
    _load_base(model, ckpt, dtype)
    _init_lora(model, seed)
    if strategy != "zero3":
        _assert_materialized(model)
    model.train()
    return LoadedModel(model, report, ckpt, ds_config)
