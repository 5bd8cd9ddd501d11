"""Adapters on disk, in PEFT's format.

``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``), so adapters trained here load
with ``peft.PeftModel.from_pretrained`` and PEFT-made adapters load here.
Tensors are only ever read from safetensors; pickled ``adapter_model.bin``
files are refused.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_dist.atomic import recover, writing_dir
from lora_dist.inputs import clip, excerpt, read_json
from lora_dist.lora import LoRAConfig, inject_lora, lora_modules
from lora_dist.merge import LoRAWeights, lora_scale

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterError",
    "AdapterWriteError",
    "AdapterFile",
    "load_adapter",
    "lora_state_dict",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be written or read as asked."""


class AdapterWriteError(AdapterError, OSError):
    """The filesystem refused an adapter write (no space, read-only...); the previous adapter is unchanged."""


#: Bytes of a safetensors header per tensor, generously (name, dtype, shape, offsets).
_HEADER_BYTES_PER_TENSOR = 512


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors by the model's own names (``<module>.lora_A.weight``), detached."""
    sd: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model):
        sd[f"{name}.lora_A.weight"] = _local(module.lora_A.weight)
        sd[f"{name}.lora_B.weight"] = _local(module.lora_B.weight)
    return sd


def _local(t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach()


def _can_generate(model: nn.Module) -> bool:
    """A causal LM: PEFT's CAUSAL_LM wrapper needs generation support (encoders like BERT get no task type)."""
    can_generate = getattr(model, "can_generate", None)
    try:
        return bool(can_generate()) if callable(can_generate) else False
    except Exception:  # a remote-code model's own implementation
        return False


def _peft_config(model: nn.Module, config: LoRAConfig, matched: list[str], base_path: str | None) -> dict[str, Any]:
    """PEFT's LoraConfig fields describing exactly the injected modules."""
    leaves = sorted({n.split(".")[-1] for n in matched})
    if config.layers_to_transform is None and config.exclude_modules is None and isinstance(
        config.target_modules, (list, type(None))
    ):
        target: list[str] | str = leaves
    else:
        # Name exactly the injected modules so PEFT reproduces them whatever the selection rules were.
        target = "^(" + "|".join(re.escape(n) for n in matched) + ")$"
    fan_in_fan_out = any(m.fan_in_fan_out for _, m in lora_modules(model))
    rank_pattern = {n: m.r for n, m in lora_modules(model) if m.r != config.r}
    alpha_pattern = {n: m.alpha for n, m in lora_modules(model) if m.alpha != config.alpha}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if _can_generate(model) else None,
        "base_model_name_or_path": base_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": target,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "modules_to_save": None,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(k): v for k, v in rank_pattern.items()},
        "alpha_pattern": {re.escape(k): v for k, v in alpha_pattern.items()},
        "use_dora": False,
        "lora_bias": False,
    }


def _check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]] | None) -> None:
    if not tensors:
        raise AdapterError("refusing to write an adapter with no tensors: the model has no LoRA layers")
    for key, t in tensors.items():
        if t.numel() == 0:
            raise AdapterError(f"refusing to write empty tensor {key} {tuple(t.shape)}: a sharded param was not gathered")
        if expected is not None and tuple(t.shape) != expected[key]:
            raise AdapterError(f"refusing to write {key}: shape {tuple(t.shape)}, expected {expected[key]}")
        if not torch.isfinite(t).all():
            raise AdapterError(f"refusing to write {key}: it holds NaN/Inf (training diverged)")


def write_adapter(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write PEFT-format files atomically (:func:`lora_dist.atomic.writing_dir`).

    ``tensors`` use the model's own names; they are saved under PEFT's keys.
    An existing adapter at ``directory`` is replaced only once the new one is complete.
    """
    directory = Path(directory)
    _check_tensors(tensors, None)
    text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    need = len(text) + sum(t.numel() * t.element_size() + _HEADER_BYTES_PER_TENSOR for t in tensors.values())
    try:
        with writing_dir(directory, replace=True) as staging:
            free = shutil.disk_usage(staging).free
            if 0 < free < need:  # some network filesystems report 0 free: let the write itself decide
                raise AdapterWriteError(
                    f"not enough space to write the adapter to {directory}: it needs {-(-need // 1024)} KB, "
                    f"{free // 1024} KB are free; free space or choose another output dir (nothing was changed)"
                )
            peft_tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(peft_tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (staging / ADAPTER_CONFIG).write_text(text)
    except AdapterError:
        raise
    except (OSError, SafetensorError) as e:
        raise _write_error(directory, e) from None
    return directory


def _write_error(directory: Path, e: BaseException) -> AdapterWriteError:
    """One line for a failed adapter write, naming the cause and the fix."""
    code = getattr(e, "errno", None)
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in reason or "No space left" in reason:
        fix = "free space or choose another output dir"
    elif code == errno.EROFS or "os error 30" in reason:
        fix = "the filesystem is read-only; choose another output dir"
    else:
        fix = "check the output dir"
    return AdapterWriteError(
        f"cannot write the adapter to {directory}: {clip(reason, 300)}; {fix} "
        "(the previous adapter there, if any, is unchanged)"
    )


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Save the model's LoRA adapter in PEFT's format.

    Works on a model whose base is sharded (FSDP2/ZeRO-3): LoRA params are
    replicated, so the local copies are whole. Call it on one rank.

    Args:
        model: the LoRA model (its layers give the config and the expected shapes).
        directory: the adapter dir to write.
        base_model_name_or_path: recorded in ``adapter_config.json``.
        tensors: the LoRA tensors to write, by the model's names, e.g. an engine's
            fp32 :meth:`~lora_dist.parallel.Engine.lora_state_dict` (default: the model's params).

    Raises:
        AdapterError: no LoRA layers, or an empty, wrong-shaped or non-finite tensor.
    """
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise AdapterError("the model has no LoRA adapter: call inject_lora(model, config) first")
    tensors = dict(tensors) if tensors is not None else lora_state_dict(model)
    expected = {}
    for name, m in lora_modules(model):
        expected[f"{name}.lora_A.weight"] = (m.r, m.in_features)
        expected[f"{name}.lora_B.weight"] = (m.out_features, m.r)
    _check_tensors(tensors, expected)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    matched = [n for n, _ in lora_modules(model)]
    return write_adapter(directory, tensors, _peft_config(model, config, matched, base_model_name_or_path))


@dataclass
class AdapterFile:
    """A PEFT-format adapter read from disk."""

    config: dict[str, Any]
    lora_config: LoRAConfig
    tensors: dict[str, torch.Tensor]  # the model's own names: "<module>.lora_A.weight"

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors})

    def weights(self) -> dict[str, LoRAWeights]:
        """Per-module adapter weights with each module's own scale (rank/alpha patterns, rsLoRA)."""
        out = {}
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        for module in self.modules():
            a = self.tensors[f"{module}.lora_A.weight"]
            b = self.tensors[f"{module}.lora_B.weight"]
            _, alpha = self.lora_config.rank_and_alpha(module)
            scale = lora_scale(a.shape[0], alpha, self.lora_config.use_rslora)
            out[module] = LoRAWeights(a, b, scale, fan_in_fan_out)
        return out


def _lora_config_from_peft(cfg: Mapping[str, Any]) -> LoRAConfig:
    init = cfg.get("init_lora_weights", True)
    return LoRAConfig(
        r=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", cfg["r"])),
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        target_modules=cfg.get("target_modules"),
        exclude_modules=cfg.get("exclude_modules") or None,
        use_rslora=bool(cfg.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "kaiming",
        layers_to_transform=cfg.get("layers_to_transform"),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
    )


def read_adapter(directory: str | os.PathLike) -> AdapterFile:
    """Read a PEFT-format LoRA adapter (safetensors only).

    Raises:
        AdapterError: missing files, a pickled checkpoint, a non-LoRA adapter,
            a feature lora_dist does not merge (DoRA, LoRA bias), or unpaired tensors.
    """
    directory = Path(directory)
    recover(directory, cleanup=False)  # a writer killed between its two renames left the adapter aside
    cfg_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path} not found: an adapter dir needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterError(
                f"{directory} has only adapter_model.bin (pickle), which lora_dist never unpickles; "
                "re-save the adapter with safe_serialization=True"
            )
        raise AdapterError(f"{weights_path} not found")
    cfg = read_json(cfg_path, AdapterError, "the adapter config")
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object (PEFT's LoraConfig), got {excerpt(cfg, 80)}; "
                           "restore the file or re-save the adapter")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{directory} is a {excerpt(cfg.get('peft_type'), 60)} adapter; lora_dist handles LORA only")
    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise AdapterError(f"{directory} uses DoRA or LoRA biases, which lora_dist does not support")
    try:
        lora_config = _lora_config_from_peft(cfg)
    except KeyError as e:
        raise AdapterError(
            f"{cfg_path}: invalid LoRA config (no {e} field); restore the file or re-save the adapter"
        ) from None
    except (ValueError, TypeError, OverflowError) as e:
        raise AdapterError(f"{cfg_path}: invalid LoRA config ({clip(str(e), 300)})") from None
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for key in f.keys():
                name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
                name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
                tensors[name] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types
        raise AdapterError(f"{weights_path} is not a readable safetensors file: {e}") from None
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    for m in modules:
        if f"{m}.lora_A.weight" not in tensors or f"{m}.lora_B.weight" not in tensors:
            raise AdapterError(f"{weights_path}: {m} has lora_A without lora_B or the reverse")
    extra = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
    if extra:
        raise AdapterError(f"{weights_path}: tensors lora_dist cannot apply (modules_to_save?): {extra[:3]}")
    _check_read_tensors(weights_path, tensors, lora_config, sorted(modules))
    return AdapterFile(cfg, lora_config, tensors)


def _check_read_tensors(path: Path, tensors: Mapping[str, torch.Tensor], config: LoRAConfig,
                        modules: list[str]) -> None:
    """Refuse adapter tensors that would merge wrongly or not at all (nothing here is applied silently).

    Raises:
        AdapterError: no tensors, a non-float tensor, a tensor that is not 2-D, lora_A and
            lora_B of different ranks, or a rank that is not the config's ``r``/``rank_pattern``.
    """
    if not modules:
        raise AdapterError(f"{path} holds no LoRA tensors: the adapter is empty; re-save it from the trained model")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(
                f"{path}: {key} is {str(t.dtype).removeprefix('torch.')}; LoRA tensors must be floating point "
                "(float32/bfloat16/float16): quantized adapters are not supported, dequantize it first"
            )
        if t.dim() != 2:
            raise AdapterError(
                f"{path}: {key} has shape {tuple(t.shape)}; LoRA tensors are 2-D: lora_A (r, in_features) and "
                "lora_B (out_features, r); the file is corrupt or not a LoRA adapter"
            )
    for module in modules:
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"{path}: {module} has lora_A of rank {a.shape[0]} but lora_B of rank {b.shape[1]}; "
                               "the file is corrupt")
        r, _ = config.rank_and_alpha(module)
        if a.shape[0] != r:
            raise AdapterError(
                f"{path}: {module} holds rank-{a.shape[0]} tensors but {ADAPTER_CONFIG} gives it r={r} "
                "(r or rank_pattern); the scale alpha/r would be wrong: fix r/rank_pattern or re-save the adapter"
            )


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format adapter into ``model``, injecting LoRA first if it has none.

    Raises:
        AdapterError: the adapter's modules or shapes do not match the model.
    """
    adapter = read_adapter(directory)
    if not any(True for _ in lora_modules(model)):
        cfg = adapter.lora_config
        # Inject exactly the modules the file holds.
        exact = "^(" + "|".join(re.escape(m) for m in adapter.modules()) + ")$"
        inject_lora(
            model,
            LoRAConfig(
                r=cfg.r,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                target_modules=exact,
                use_rslora=cfg.use_rslora,
                init=cfg.init,
                rank_pattern=cfg.rank_pattern,
                alpha_pattern=cfg.alpha_pattern,
            ),
        )
        model.lora_config = cfg
    layers = dict(lora_modules(model))
    missing = sorted(set(adapter.modules()) - set(layers))
    if missing:
        raise AdapterError(f"adapter modules not in the model: {missing[:5]}; the adapter is for a different base")
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is not None and config.use_rslora != adapter.lora_config.use_rslora:
        model.lora_config = dataclasses.replace(config, use_rslora=adapter.lora_config.use_rslora)
    with torch.no_grad():
        for module, w in adapter.weights().items():
            layer = layers[module]
            for part, tensor in (("lora_A", w.lora_A), ("lora_B", w.lora_B)):
                param = getattr(layer, part).weight
                if tuple(param.shape) != tuple(tensor.shape):
                    raise AdapterError(
                        f"{module}.{part}: adapter shape {tuple(tensor.shape)} != model shape "
                        f"{tuple(param.shape)}; the adapter is for a different base or rank"
                    )
                param.copy_(tensor.to(param.dtype))
            # The adapter's own scaling replaces whatever the model was injected with.
            layer.alpha = adapter.lora_config.rank_and_alpha(module)[1]
            layer.use_rslora = adapter.lora_config.use_rslora
            layer.scale = w.scale
    return model
