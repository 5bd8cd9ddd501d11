"""Adapters on disk, in PEFT's format.

``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``), so adapters trained here load
with ``peft.PeftModel.from_pretrained`` and PEFT-made adapters load here.

An adapter on a parameter (``target_parameters``, :class:`~lora_dist.lora.LoRAParam`)
is named as PEFT nests its ``ParamWrapper`` s: the owner's last adapted parameter
(in registration order) under the owner's name, each earlier one under one more
``.base_layer`` (Mixtral: ``experts.lora_A`` is ``down_proj``'s,
``experts.base_layer.lora_A`` is ``gate_up_proj``'s). Which parameter a name means
depends on the model, so :meth:`AdapterFile.weights` takes the model (a meta skeleton does).
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

from lora_dist.atomic import recover, writing_dir
from lora_dist.chat import MAX_TEMPLATE_BYTES
from lora_dist.dtypes import all_finite
from lora_dist.errors import UserError
from lora_dist.outputs import ADAPTER_FILES, CHAT_TEMPLATE_FILE, check_replaceable
from lora_dist.inputs import clip, excerpt, read_json, read_text
from lora_dist.lora import LoRAConfig, LoRAParam, inject_lora, language_model, lora_modules, param_targets
from lora_dist.merge import LoRAWeights, lora_scale
from lora_dist.quant import NF4Record, nf4_record
from lora_dist.releases import installed
from lora_dist.safetensors_file import write_safetensors
from lora_dist.sharding import full_shape

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterError",
    "AdapterWriteError",
    "AdapterFile",
    "adapter_chat_template",
    "adapter_step",
    "load_adapter",
    "lora_state_dict",
    "installed_peft_misreads",
    "peft_misread",
    "peft_names",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
#: The header key of the training step an adapter holds (:func:`adapter_step`).
STEP_KEY = "lora_dist_step"
#: PEFT's ``LoraConfig`` defaults of the fields an adapter config may leave out: ``r`` and ``lora_alpha``.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
#: ``adapter_config.json`` fields of PEFT (0.21) that, set, make the update something other than
#: ``scale * B @ A`` added to the base weight for every token: refused by name, never applied as plain LoRA.
#: (VeLoRA and MiCA change training only: their update is plain LoRA's.)
LORA_VARIANT_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "alora_invocation_tokens": "aLoRA, active only after its invocation tokens",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token embeddings",
}
#: ``init_lora_weights`` values of PEFT that change the base weights (PiSSA, OLoRA, CorDA, LoftQ): an adapter saved
#: with one is relative to the changed base (PEFT writes ``true`` once it converts it back).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class AdapterError(UserError, ValueError):
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


def _peft_param_name(owner: str, names: list[str], parameter: str) -> str:
    """PEFT's module name for the adapter of ``owner.parameter`` among the owner's adapted ``names``."""
    return owner + ".base_layer" * (len(names) - 1 - names.index(parameter))


def peft_names(model: nn.Module) -> dict[str, str]:
    """Each LoRA module's name in the model -> its module name in a PEFT adapter (they differ for parameters)."""
    out = {}
    for name, m in lora_modules(model):
        if isinstance(m, LoRAParam):
            owner = name[: -len(f".lora.{m.parameter_name}")]
            out[name] = _peft_param_name(owner, list(m._owner().lora.keys()), m.parameter_name)
        else:
            out[name] = name
    return out


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
    """PEFT's LoraConfig fields describing exactly the injected modules and parameters."""
    layers = {n: m for n, m in lora_modules(model) if not isinstance(m, LoRAParam)}
    params = {n[: -len(f"lora.{m.parameter_name}")] + m.parameter_name: m
              for n, m in lora_modules(model) if isinstance(m, LoRAParam)}
    matched = [n for n in matched if n in layers]
    leaves = sorted({n.split(".")[-1] for n in matched})
    # Leaf names select what PEFT selects, but in the whole model: not where injection kept to a vision-language
    # model's language model.
    plain = config.layers_to_transform is None and config.exclude_modules is None and language_model(model) is None
    if not matched:
        target: list[str] | None = None
    elif plain and isinstance(config.target_modules, (list, type(None))) and not _peft_converts_targets(model):
        target = leaves
    else:
        # Name exactly the injected modules, in full, so PEFT reproduces them whatever the selection rules were. A
        # list, not a regex: on a model whose targets PEFT converts to its fused experts, PEFT 0.22 turns a regex
        # into leaf names, and a leaf named like an expert projection (a shared expert's gate_proj) adapts the
        # routed experts too (untrained, "missing adapter keys"); a full name is no expert's.
        target = list(matched)
    # PEFT matches a parameter whose full name equals an entry or ends with "." + it.
    target_parameters = (list(config.target_parameters) if plain else sorted(params)) if params else None
    fan_in_fan_out = any(m.fan_in_fan_out for m in layers.values())
    adapted = {**layers, **params}  # PEFT's rank/alpha patterns match module names, and parameter names
    rank_pattern = {n: m.r for n, m in adapted.items() if m.r != config.r}
    alpha_pattern = {n: m.alpha for n, m in adapted.items() if m.alpha != config.alpha}
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
        "target_parameters": target_parameters,
    }


def _check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]] | None) -> None:
    if not tensors:
        raise AdapterError("refusing to write an adapter with no tensors: the model has no LoRA layers")
    for key, t in tensors.items():
        if t.numel() == 0:
            raise AdapterError(f"refusing to write empty tensor {key} {tuple(t.shape)}: a sharded param was not gathered")
        if expected is not None and tuple(t.shape) != expected[key]:
            raise AdapterError(f"refusing to write {key}: shape {tuple(t.shape)}, expected {expected[key]}")
        if not all_finite(t):
            raise AdapterError(f"refusing to write {key}: it holds NaN/Inf (training diverged)")


def check_adapter_dir(directory: Path) -> None:
    """Refuse a ``directory`` that is a file or holds anything but an adapter's files (:func:`check_replaceable`)."""
    check_replaceable(directory, (*ADAPTER_FILES, CHAT_TEMPLATE_FILE), "the adapter", AdapterError)


def write_adapter(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                  metadata: Mapping[str, str] | None = None, chat_template: str | None = None) -> Path:
    """Write PEFT-format files atomically (:func:`lora_dist.atomic.writing_dir`).

    ``tensors`` use the model's own names; they are saved under PEFT's keys, with ``metadata`` added to the
    safetensors header (PEFT reads only the tensors). ``chat_template``, the one training rendered its data with,
    is written as ``chat_template.jinja`` (the merge writes it into the merged checkpoint).
    An existing adapter at ``directory`` is replaced only once the new one is complete; a dir that holds any other
    file is refused (:class:`AdapterError`), nothing changed.
    """
    directory = Path(directory)
    _check_tensors(tensors, None)
    check_adapter_dir(directory)
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
            write_safetensors(staging / ADAPTER_WEIGHTS, peft_tensors, metadata={"format": "pt", **(metadata or {})})
            (staging / ADAPTER_CONFIG).write_text(text)
            if chat_template is not None:
                (staging / CHAT_TEMPLATE_FILE).write_text(chat_template)
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


#: The transformers-4 projection names PEFT (0.21) remaps onto the fused experts when it loads an adapter into a
#: model of transformers' Mixtral or Qwen2-MoE conversion pattern, whichever module the target names
#: (``peft/utils/transformers_weight_conversion.py``: ``_MOE_TARGET_MODULE_MAPPING``).
_PEFT_EXPERT_NAMES = {"mixtral": frozenset({"gate", "w1", "w2", "w3"}),
                      "qwen2_moe": frozenset({"gate", "gate_proj", "up_proj", "down_proj"})}


def _peft_expert_pattern(model: nn.Module) -> str | None:
    """The conversion pattern PEFT applies to ``model``'s adapter targets: ``mixtral`` or ``qwen2_moe`` (DeepSeek-V2/V3,
    Qwen3-MoE, Qwen3-Next, GLM-4-MoE, OLMoE...), by its model type as transformers maps it, else None (Qwen2-MoE
    itself, gpt-oss, every dense model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # a transformers without it has no fused experts to convert to
        return None
    pattern = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(model_type)  # PEFT adds mixtral
    return pattern if pattern in _PEFT_EXPERT_NAMES else None


def _peft_converts_targets(model: nn.Module) -> bool:
    """Whether PEFT 0.22 converts ``model``'s adapter targets named like expert projections to its fused experts:
    the models of :func:`_peft_expert_pattern`, and Qwen2-MoE, which PEFT 0.22 adds to transformers' patterns."""
    return _peft_expert_pattern(model) is not None or \
        getattr(getattr(model, "config", None), "model_type", None) == "qwen2_moe"


#: The first PEFT release that loads the layers :func:`peft_misread` names as trained (tests/test_hub_archs.py).
PEFT_READS_EXPERT_NAMES = (0, 22)


def installed_peft_misreads() -> bool:
    """Whether the PEFT installed here misreads the layers :func:`peft_misread` names (a release before
    :data:`PEFT_READS_EXPERT_NAMES`); True without PEFT, since the adapter may then meet any release."""
    peft = installed("peft")
    return peft is None or peft < PEFT_READS_EXPERT_NAMES


def peft_misread(model: nn.Module) -> list[str]:
    """The adapted linear layers PEFT 0.21 and earlier would not load as adapted. Loading an adapter into a model of
    Mixtral's or Qwen2-MoE's conversion pattern (:func:`_peft_expert_pattern`), PEFT 0.21 moves every target named
    like a transformers-4 expert projection (``gate_proj``, ``up_proj``, ``down_proj``, ``gate``; Mixtral's
    ``w1``..``w3``) onto the fused experts: an adapter on a dense layer's or a shared expert's MLP then loads into
    fresh expert LoRA, and those layers load unadapted. PEFT 0.22 loads them as trained (tested), as lora_dist's own
    loader, merge and export do."""
    pattern = _peft_expert_pattern(model)
    if pattern is None:
        return []
    return [n for n, m in lora_modules(model)
            if not isinstance(m, LoRAParam) and n.rsplit(".", 1)[-1] in _PEFT_EXPERT_NAMES[pattern]]


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None, step: int | None = None,
                 chat_template: str | None = None) -> Path:
    """Save the model's LoRA adapter in PEFT's format.

    Works on a model whose base is sharded (FSDP2/ZeRO-3): LoRA params are
    replicated, so the local copies are whole. Call it on one rank.

    Args:
        model: the LoRA model (its layers give the config and the expected shapes).
        directory: the adapter dir to write.
        base_model_name_or_path: recorded in ``adapter_config.json``.
        tensors: the LoRA tensors to write, by the model's names, e.g. an engine's
            fp32 :meth:`~lora_dist.parallel.Engine.lora_state_dict` (default: the model's params).
        step: the training step the tensors hold, recorded in the header (:func:`adapter_step`).
        chat_template: the chat template training used (``data.chat_template``), written beside the weights.

    Raises:
        AdapterError: no LoRA layers, or an empty, wrong-shaped or non-finite tensor.
    """
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise AdapterError("the model has no LoRA adapter: call inject_lora(model, config) first")
    tensors = dict(tensors) if tensors is not None else lora_state_dict(model)
    expected = {}
    for name, m in lora_modules(model):
        expected[f"{name}.lora_A.weight"] = (m.r * m.num_experts, m.in_features)
        expected[f"{name}.lora_B.weight"] = (m.out_features, m.r * m.num_experts)
    _check_tensors(tensors, expected)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    matched = [n for n, _ in lora_modules(model)]
    names = peft_names(model)
    renamed = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".lora_")
        renamed[f"{names.get(module, module)}.lora_{part}"] = t
    metadata = trained_on(model)
    if step is not None:
        metadata[STEP_KEY] = str(int(step))
    return write_adapter(directory, renamed, _peft_config(model, config, matched, base_model_name_or_path), metadata,
                         chat_template)


def trained_on(model: nn.Module) -> dict[str, str]:
    """What an adapter records of the base it was trained on, in its safetensors header: the weights stored as NF4,
    a set that depends on the run's sharding, so that ``lora-dist export RUN_DIR`` merges into the base the run
    trained on, on any number of ranks."""
    record = nf4_record(model)
    return {} if record is None else record.header()


def adapter_step(directory: str | os.PathLike) -> int | None:
    """The training step an adapter's header records (``save_adapter(step=...)``: ``lora-dist train``'s adapter);
    None where it records none (PEFT's, an older lora_dist's) or its weights file is unreadable."""
    try:
        with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), "pt") as fh:
            value = (fh.metadata() or {}).get(STEP_KEY, "")
    except (OSError, SafetensorError):
        return None
    return int(value) if value.isdigit() else None


def adapter_chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template an adapter dir carries (``chat_template.jinja``: the one its training rendered with), or None.

    Raises:
        AdapterError: the file is unreadable, too large or not UTF-8.
    """
    path = Path(directory) / CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    return read_text(path, AdapterError, "the adapter's chat template", max_bytes=MAX_TEMPLATE_BYTES)


def adapter_nf4_record(directory: str | os.PathLike) -> NF4Record | None:
    """The :class:`~lora_dist.quant.NF4Record` an adapter's header carries; None where it carries none (PEFT's, an
    older lora_dist's, an unquantized run's) or its weights file is missing or unreadable (reading the adapter
    says why)."""
    try:
        with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), "pt") as fh:
            return NF4Record.from_header(fh.metadata() or {})
    except (OSError, SafetensorError):
        return None


@dataclass
class AdapterFile:
    """A PEFT-format adapter read from disk."""

    config: dict[str, Any]
    lora_config: LoRAConfig
    tensors: dict[str, torch.Tensor]  # the model's own names: "<module>.lora_A.weight"

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors})

    def parameters(self, model: nn.Module) -> dict[str, str]:
        """The adapted parameters' full names (``...experts.gate_up_proj``) -> their PEFT module names,
        found in ``model`` (or its meta skeleton) as PEFT finds them.

        Raises:
            AdapterError: a parameter ``target_parameters`` matches has no tensors in the file.
        """
        out = {}
        for owner, names in param_targets(model, self.lora_config.target_parameters).items():
            for pname in names:
                out[f"{owner}.{pname}"] = _peft_param_name(owner, names, pname)
        missing = sorted(p for p, m in out.items() if f"{m}.lora_A.weight" not in self.tensors)
        if missing:
            raise AdapterError(f"the adapter's target_parameters match {missing[0]} in the model, but the adapter has "
                               "no tensors for it; the adapter is for a different base")
        return out

    def weights(self, model: nn.Module | None = None) -> dict[str, LoRAWeights]:
        """Adapter weights with each one's own scale (rank/alpha patterns, rsLoRA): by module name, and by full
        parameter name for ``target_parameters`` (``model`` is then needed; its meta skeleton will do).

        Raises:
            AdapterError: ``target_parameters`` without ``model``, or tensors whose shapes do not fit it.
        """
        params = {}
        if self.lora_config.target_parameters:
            if model is None:
                raise AdapterError("an adapter with target_parameters is read against its model (pass model=)")
            params = self.parameters(model)
        out = {}
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        modules = sorted(set(self.modules()) - set(params.values()))
        if model is not None:
            known = {name for name, _ in model.named_modules()}
            missing = [m for m in modules if m not in known]
            if missing:
                raise AdapterError(f"adapter modules not in the model: {missing[:5]}; the adapter is for a different "
                                   "base, or its target_parameters were edited")
        for module in modules:
            a = self.tensors[f"{module}.lora_A.weight"]
            b = self.tensors[f"{module}.lora_B.weight"]
            r, alpha = self.lora_config.rank_and_alpha(module)
            if a.shape[0] != r:  # read_adapter left this to the model where the rows may be E * r
                raise AdapterError(f"{module} holds rank-{a.shape[0]} tensors but {ADAPTER_CONFIG} gives it r={r} "
                                   "(r or rank_pattern); fix r/rank_pattern or re-save the adapter")
            scale = lora_scale(a.shape[0], alpha, self.lora_config.use_rslora)
            out[module] = LoRAWeights(a, b, scale, fan_in_fan_out)
        for param, module in params.items():
            out[param] = self._param_weights(model, param, module)
        return out

    def _param_weights(self, model: nn.Module, param: str, module: str) -> LoRAWeights:
        owner, _, pname = param.rpartition(".")
        owner_module = model.get_submodule(owner)
        shape = full_shape(getattr(owner_module, pname))
        experts = shape[0] if len(shape) == 3 else 0
        transposed = bool(experts) and bool(getattr(owner_module, "is_transposed", False))
        in_f, out_f = (shape[-2], shape[-1]) if transposed else (shape[-1], shape[-2])
        r, alpha = self.lora_config.rank_and_alpha(param)
        a, b = self.tensors[f"{module}.lora_A.weight"], self.tensors[f"{module}.lora_B.weight"]
        rows = r * max(experts, 1)
        if tuple(a.shape) != (rows, in_f) or tuple(b.shape) != (out_f, rows):
            raise AdapterError(
                f"{param} {shape}: the adapter's lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not "
                f"({rows}, {in_f}) / ({out_f}, {rows}) for r={r}; the adapter is for a different base or rank"
            )
        return LoRAWeights(a, b, lora_scale(r, alpha, self.lora_config.use_rslora), transposed, experts)

    def injection_config(self, model: nn.Module) -> LoRAConfig:
        """The LoRA config that injects exactly the modules and parameters this file holds into ``model``
        (or its meta skeleton), with the file's ranks, alphas and init."""
        params = self.parameters(model) if self.lora_config.target_parameters else {}
        modules = sorted(set(self.modules()) - set(params.values()))
        exact = "^(" + "|".join(re.escape(m) for m in modules) + ")$" if modules else None
        return dataclasses.replace(self.lora_config, target_modules=exact, exclude_modules=None,
                                   layers_to_transform=None, target_parameters=sorted(params) or None)

    def model_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors by the names ``model``'s LoRA modules give them (``lora_state_dict``'s names)."""
        names = {peft: ours for ours, peft in peft_names(model).items()}
        out = {}
        for key, t in self.tensors.items():
            module, _, part = key.rpartition(".lora_")
            out[f"{names.get(module, module)}.lora_{part}"] = t
        return out


def _lora_config_from_peft(cfg: Mapping[str, Any]) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT ``adapter_config.json``, a field it leaves out taking PEFT's default."""
    init = cfg.get("init_lora_weights", True)
    return LoRAConfig(
        r=int(cfg.get("r", PEFT_DEFAULT_R)),
        alpha=float(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        target_modules=cfg.get("target_modules") or None,  # PEFT writes [] for target_parameters alone
        exclude_modules=cfg.get("exclude_modules") or None,
        use_rslora=bool(cfg.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "kaiming",
        layers_to_transform=cfg.get("layers_to_transform"),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        target_parameters=list(cfg["target_parameters"]) if cfg.get("target_parameters") else None,
    )


def read_adapter(directory: str | os.PathLike) -> AdapterFile:
    """Read a PEFT-format LoRA adapter (safetensors only).

    Raises:
        AdapterError: missing files, a pickled checkpoint, a non-LoRA adapter, a PEFT variant lora_dist does not
            merge (:data:`LORA_VARIANT_FIELDS`: DoRA, LoRA bias, aLoRA...), LoRA on an embedding, or unpaired tensors.
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
    # set as PEFT reads it: a true value, or a sub-config (a dict, even an empty one, is a config of defaults)
    variant = next((f for f in LORA_VARIANT_FIELDS if isinstance(cfg.get(f), dict) or cfg.get(f)), None)
    if variant is not None:
        raise AdapterError(
            f"{cfg_path} sets {variant} ({LORA_VARIANT_FIELDS[variant]}), which lora_dist does not support (it is "
            f"not plain LoRA); use the adapter with PEFT, or retrain it without {variant}"
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"{cfg_path}: init_lora_weights={init} moved part of the base weights into the adapter, and the adapter "
            "was saved without converting it back, so its A/B are relative to that changed base (merged into the "
            "base it would count that part twice); save it with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=DIR), which writes it relative to the base"
        )
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
    embedding = sorted({k.rsplit(".lora_embedding_", 1)[0] for k in tensors if ".lora_embedding_" in k})
    if embedding:
        raise AdapterError(
            f"{weights_path}: {embedding[0]} is an embedding with LoRA (lora_embedding_A/B), which lora_dist does not "
            f"support; retrain without {embedding[0].rpartition('.')[2]} in target_modules"
        )
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
        if config.target_parameters:
            # maybe a stack of experts (E * r rows) whose rank_pattern PEFT matches against the parameter's name,
            # not this module's: checked against the model (AdapterFile.weights)
            continue
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
    params = adapter.parameters(model) if adapter.lora_config.target_parameters else {}
    if not any(True for _ in lora_modules(model)):
        inject_lora(model, adapter.injection_config(model))
        model.lora_config = adapter.lora_config
    layers = dict(lora_modules(model))
    ours = {p: f"{p.rpartition('.')[0]}.lora.{p.rpartition('.')[2]}" for p in params}  # param -> its LoRAParam
    weights = adapter.weights(model)
    missing = sorted(ours.get(k, k) for k in weights if ours.get(k, k) not in layers)
    if missing:
        raise AdapterError(f"adapter modules not in the model: {missing[:5]}; the adapter is for a different base")
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is not None and config.use_rslora != adapter.lora_config.use_rslora:
        model.lora_config = dataclasses.replace(config, use_rslora=adapter.lora_config.use_rslora)
    with torch.no_grad():
        for module, w in weights.items():
            layer = layers[ours.get(module, module)]
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
