"""Building a LoRA model from a local HF model dir, in the documented setup order.

    build skeleton on meta -> inject LoRA -> parallelize -> materialize
    -> each rank loads only the base tensors (or rows/slices) it owns
    (model.quantize=nf4: the blocks' linear weights become empty NF4 tensors before parallelize, and
    each rank quantizes the rows it reads; :mod:`lora_dist.quant`, :mod:`lora_dist.nf4`)
    -> initialize LoRA identically on every rank -> assert nothing is on meta

No rank ever reads or holds the whole base model: under fsdp2 a rank reads
the rows of each weight its ``Shard(0)`` DTensor owns; under zero3 the model
is built under ``deepspeed.zero.Init`` (partitioned as each module is created)
and a rank reads the flat element range of its partition. A param transformers
assembles from several checkpoint tensors (MoE experts) is read the same way,
range by range from the per-expert tensors (:mod:`lora_dist.weight_mapping`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from lora_dist.config import ModelConfig, ParallelConfig
from lora_dist.dtypes import parse_dtype
from lora_dist.errors import ConfigError
from lora_dist.lora import InjectionReport, LoRAConfig, inject_lora, lora_modules, lora_parameters
from lora_dist.model_dir import ModelDir, ModelDirError, kept_in_fp32, model_class
from lora_dist.nf4 import is_quantized, load_quantized, nf4_module
from lora_dist.parallel import parallelize
from lora_dist.quant import NF4Record, prepare_quantized, quantize_problem
from lora_dist.sharding import full_shape, owned_range, whole_local
from lora_dist.weight_mapping import WeightMap

__all__ = ["LoadedModel", "base_dropout", "check_layer_drop", "load_base_model", "load_model", "place_unsharded"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """The model :func:`load_model` built, what the injection did, and the base model dir it read."""

    model: nn.Module
    report: InjectionReport
    base: ModelDir
    ds_config: dict | None = None


@torch.no_grad()
def _load_base(model: nn.Module, base: ModelDir, weights: WeightMap) -> None:
    """Copy each base param's owned bytes (:func:`~lora_dist.sharding.owned_range`) from the files.

    ``weights`` names where each param is: one tensor of the dir, or several that transformers'
    conversion mapping assembles (MoE experts); either way only the owned range is read.
    """
    lora = {id(p) for p in lora_parameters(model)}
    names: dict[int, list[str]] = {}  # a tied parameter's every name: a checkpoint may store it under any of them
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    missing = []
    for name, param in model.named_parameters():
        if id(param) in lora:
            continue
        source = next(filter(None, map(weights.source, names[id(param)])), None)
        if source is None:
            missing.append(name)
            continue
        shape = full_shape(param)
        if source.shape != shape:
            raise ModelDirError(
                f"{source.describe()}: checkpoint shape {source.shape} != model shape {shape}; "
                "config.json and weights disagree"
            )
        owned = owned_range(param)
        if is_quantized(param):  # model.quantize: this rank's rows, quantized as they are read (collective)
            load_quantized(param, source.read() if owned is None else source.read_flat(owned.start, owned.end))
        elif owned is None:
            local = whole_local(param)
            local.copy_(source.read().to(local.dtype))
        elif owned.end > owned.start:
            owned.local.copy_(source.read_flat(owned.start, owned.end).to(owned.local.dtype))
    if missing:
        raise ModelDirError(f"{base.path}: no weights for {missing[:5]}; the checkpoint does not match its config.json")
    for name, buf in model.named_buffers():
        key = weights.base_key(name)
        if key is not None and tuple(buf.shape) == base.shape(key):
            buf.copy_(base.read(key).to(buf.dtype))


def keep_fp32_buffers(model: nn.Module, dtype: torch.dtype | None) -> None:
    """The buffers a model keeps in fp32 whatever its dtype (``_keep_in_fp32_modules_strict``: DeepSeek-V3's and
    GLM-4.5's expert-selection bias ``e_score_correction_bias``), made fp32 again under a bf16 or fp16 ``dtype``, as
    ``from_pretrained`` loads them (``from_config`` builds them in ``dtype``: two biases 4e-4 apart became one, and
    another expert fired). Parameters on that list (ERNIE-4.5's router weight and expert-selection bias) are built in
    fp32 by the model itself and stay so under ``none``, ``ddp`` and ``fsdp2`` (FSDP2 gathers a unit's mixed dtypes
    as they are); DeepSpeed casts them to its dtype (:func:`fp32_params_deepspeed_casts`)."""
    kept = _kept_in_fp32(model, dtype)
    for name, module in model.named_modules():
        for attr, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point() and kept(f"{name}.{attr}" if name else attr):
                module._buffers[attr] = buf.float()


def _buffers_built_outside_zero_init(model: nn.Module, cls, hf_config, dtype: torch.dtype) -> None:
    """Put back the buffers ``cls.from_config`` builds outside DeepSpeed's ``zero.Init``, which builds them with its
    own tensor factories in its dtype: a rotary ``inv_freq`` transformers computes in fp32 came out bf16 under zero3
    (up to 0.5% off; Llama-3's rotary angle 7 rad off at position 4096), where every other strategy has fp32.
    The model is built again with its parameters on the meta device: only its buffers are real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        built = dict(cls.from_config(hf_config, dtype=dtype).named_buffers(remove_duplicate=False))
    for name, module in model.named_modules():
        for attr, buf in list(module._buffers.items()):
            right = built.get(f"{name}.{attr}" if name else attr)
            if buf is not None and right is not None:
                module._buffers[attr] = right.to(buf.device)


def fp32_params_deepspeed_casts(model: nn.Module, dtype: torch.dtype | None) -> list[str]:
    """The parameters a model keeps in fp32 whatever its dtype (``_keep_in_fp32_modules_strict``) that DeepSpeed's
    engine holds in a bf16 or fp16 ``dtype`` instead (it casts the whole module): their names."""
    kept = _kept_in_fp32(model, dtype)
    return [n for n, p in model.named_parameters() if p.is_floating_point() and kept(n)]


def _kept_in_fp32(model: nn.Module, dtype: torch.dtype | None):
    """Whether a parameter or buffer name is one the model keeps in fp32 under a bf16 or fp16 ``dtype``
    (``_keep_in_fp32_modules_strict``, matched as ``from_pretrained`` matches it, :func:`kept_in_fp32`)."""
    return kept_in_fp32((), getattr(model, "_keep_in_fp32_modules_strict", None) or (), dtype)


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


def _is_dropout(name: str) -> bool:
    """A name transformers gives a dropout probability: ``attention_dropout``, ``resid_pdrop``, ``residual_dropout``,
    ``embedding_dropout``, ``activation_dropout``..., and LayerDrop's (``layerdrop``: OPT, XGLM, BioGPT skip a random
    whole layer in training)."""
    return "dropout" in name or "pdrop" in name or "layerdrop" in name


def _config_holders(config) -> tuple:
    """A transformers config and its sub-configs (``text_config``...): where its fields are."""
    return (config, *(v for v in vars(config).values() if hasattr(v, "to_dict")))


def check_layer_drop(model_cfg: ModelConfig, strategy: str, hf_config) -> None:
    """Refuse a base that skips random layers in training (LayerDrop: a config's ``layerdrop`` > 0) under a strategy
    that gathers each layer's weights: each rank draws its own layers to skip, so the ranks' gathers would no longer
    pair (a hang). ``model.base_dropout=false`` turns LayerDrop off with the base's dropout (:func:`base_dropout`).

    Raises:
        ConfigError: LayerDrop on under fsdp2 or zero3, in one line.
    """
    if not model_cfg.base_dropout or strategy not in ("fsdp2", "zero3"):
        return
    for holder in _config_holders(hf_config):
        for attr, value in vars(holder).items():
            if "layerdrop" in attr and isinstance(value, (int, float)) and value > 0:
                raise ConfigError(f"the base model skips random layers in training ({attr}={value:g} in its "
                                  f"config.json), drawn on each rank apart: under parallel.strategy={strategy} the "
                                  "ranks would gather different layers and hang; set model.base_dropout=false (turns "
                                  "it off with the base's dropout) or parallel.strategy=ddp")


def base_dropout(model: nn.Module, turn_off: bool = False) -> dict[str, float]:
    """The base model's own dropout, active in training: ``{module name or "module.attribute": p}`` for each
    ``nn.Dropout`` and each float dropout attribute with p > 0 (Llama's ``attention_dropout`` handed to the attention
    kernel, Seed-OSS's ``residual_dropout``). ``turn_off``: each set to 0 as it is found, and so are the dropout
    fields of the model's configs, which some models read at every forward (Persimmon). LoRA's dropout
    (``lora.dropout``) is not the base's."""
    found: dict[str, float] = {}
    configs = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "lora_dropout":
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p > 0:
                found[name] = float(module.p)
                module.p = 0.0 if turn_off else module.p
            continue
        for attr, value in list(vars(module).items()):  # plain attributes; submodules are found on their own
            if _is_dropout(attr) and isinstance(value, float) and value > 0:
                found[f"{name}.{attr}" if name else attr] = value
                if turn_off:
                    setattr(module, attr, 0.0)
        config = getattr(module, "config", None)
        if turn_off and config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
    for config in configs.values():
        for holder in _config_holders(config):
            for attr, value in list(vars(holder).items()):
                if _is_dropout(attr) and isinstance(value, float) and value > 0:
                    setattr(holder, attr, 0.0)
    return found


def _no_init_weights():
    """Skip random init of weights that are about to be loaded."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def place_unsharded(model: nn.Module, device: torch.device) -> None:
    """Move what FSDP2 does not manage (the LoRA params, kept out of sharding, and the buffers) to ``device``.

    With ``parallel.cpu_offload`` the base shards are materialized in host memory, where
    ``CPUOffloadPolicy`` wants them (pinned on CUDA), and FSDP2 copies each unit to the device
    for its all-gather; everything else must still be on the device for the forward.
    """
    lora = {id(p) for p in lora_parameters(model)}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in lora and param.device != device:  # no optimizer yet: the param may be replaced
                setattr(module, name, nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad))
        for name, buf in list(module.named_buffers(recurse=False)):
            setattr(module, name, buf.to(device))


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a model built on the meta device (its buffers real) on ``device``, uninitialized; buffers and tied
    parameters kept."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    ties = _tied_parameters(model)
    model.to_empty(device=device)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
    for owner, alias in ties:  # to_empty gives each module its own tensor: tie them again
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(owner))


def load_base_model(base: ModelDir, device: torch.device) -> nn.Module:
    """The base model whole on ``device``, in its declared dtype, in eval mode, its weights read as training reads
    them (a quantized checkpoint dense, :mod:`lora_dist.prequantized`), with its generation config."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    hf_config = base.hf_config
    with init_empty_weights(include_buffers=False):
        model = model_class(hf_config).from_config(hf_config, dtype=parse_dtype(getattr(hf_config, "dtype", None)))
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    keep_fp32_buffers(model, parse_dtype(getattr(hf_config, "dtype", None)))
    weights = WeightMap.of(base, model)
    _materialize(model, device)
    _load_base(model, base, weights)
    _assert_materialized(model)
    if (base.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base.path)
    return model.eval()


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
    base: ModelDir | None = None,
    quantize_only: NF4Record | None = None,
) -> LoadedModel:
    """Build the LoRA model for ``parallel_cfg.strategy`` in the documented setup order.

    Args:
        model_cfg: ``model.path`` (local HF dir) and the base dtype.
        lora_cfg: what to adapt.
        parallel_cfg: strategy and its options.
        device: this rank's device.
        seed: LoRA init seed (the same on every rank).
        ds_config: DeepSpeed config, for ``zero*`` strategies
            (:func:`lora_dist.parallel.deepspeed.deepspeed_config`).
        base: the base model dir, if the caller opened it already (else ``model_cfg.path`` is opened).
        quantize_only: with ``model.quantize``, a run's NF4 weights, to store those as NF4 (its export on another
            number of ranks; :func:`lora_dist.quant.prepare_quantized`); default: all this sharding can split.

    Raises:
        ModelDirError: a missing/corrupt model dir or weights that do not fit its config.
    """
    from accelerate import init_empty_weights

    base = base or ModelDir(model_cfg.path)
    hf_config = base.hf_config
    dtype = parse_dtype(model_cfg.dtype)
    cls = model_class(hf_config)
    strategy = parallel_cfg.strategy
    problem = quantize_problem(model_cfg.quantize, strategy)
    if problem:
        raise ConfigError(problem)
    if model_cfg.quantize:
        nf4_module()  # torchao installed, before anything is built
    if strategy == "zero3":
        from lora_dist.parallel.deepspeed import check_supported, zero_init

        check_supported(strategy, parallel_cfg.activation_checkpointing)
        # Parameters are partitioned as each module is created: no rank builds the whole model.
        # The dtype comes from the DeepSpeed config's bf16/fp16 sections (an explicit dtype is
        # ignored by DeepSpeed on accelerators without fp16 support).
        with zero_init(ds_config), _no_init_weights():
            model = cls.from_config(hf_config, dtype=dtype)
        _buffers_built_outside_zero_init(model, cls, hf_config, dtype)
    else:
        # Parameters on meta, buffers (rotary tables, position ids) real.
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(hf_config, dtype=dtype)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # tied embeddings share one parameter (checkpoints store it once)
    keep_fp32_buffers(model, dtype)
    cast = fp32_params_deepspeed_casts(model, dtype) if strategy.startswith("zero") else []
    if cast and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        log.warning("%s: transformers keeps %s in fp32 (%s...), DeepSpeed (parallel.strategy=%s) holds them in %s; "
                    "fsdp2 or ddp keep them in fp32", cls.__name__, "these parameters" if len(cast) > 1 else "it",
                    cast[0], strategy, str(dtype).removeprefix("torch."))
    # Before parallelize: transformers looks its conversion mapping up by class names FSDP2 changes.
    weights = WeightMap.of(base, model)
    report = inject_lora(model, lora_cfg)
    if not model_cfg.base_dropout:
        base_dropout(model, turn_off=True)
    if model_cfg.quantize:  # NF4 before sharding: FSDP2 shards NF4, materializing allocates only its bytes
        import torch.distributed as dist

        from lora_dist.parallel import dp_mesh_shape

        # fsdp2 shards over dp_shard ranks (all of them, or one replica group's under hybrid sharding).
        world = dist.get_world_size() if dist.is_initialized() else 1
        shards = dp_mesh_shape(parallel_cfg, world)[1] if strategy == "fsdp2" else 1
        offload = strategy == "fsdp2" and parallel_cfg.cpu_offload
        if offload and shards == 1:  # parallelize leaves NF4 weights out of FSDP2 there: nothing would offload them
            raise ConfigError("parallel.cpu_offload with model.quantize=nf4 needs the base sharded over 2 or more "
                              "ranks (parallel.dp_shard >= 2); on one rank drop parallel.cpu_offload")
        prepare_quantized(model, model_cfg.quantize, shards, torch.device("cpu") if offload else device,
                          model_cfg.quantize_embeddings, only=quantize_only)
    parallelize(model, parallel_cfg, device)
    if strategy != "zero3":
        offload = strategy == "fsdp2" and parallel_cfg.cpu_offload
        _materialize(model, torch.device("cpu") if offload else device)
        if offload:
            place_unsharded(model, device)
    _load_base(model, base, weights)
    _init_lora(model, seed)
    if strategy != "zero3":
        _assert_materialized(model)
    model.train()
    return LoadedModel(model, report, base, ds_config)
