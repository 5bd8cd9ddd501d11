"""LoRA layers and injection.

``LoRALinear`` replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``) in place and
keeps the base ``weight``/``bias`` under their original names, so a base
checkpoint loads into an injected model unchanged - also onto a meta-device
skeleton, which is how the distributed setup builds models::

    h = W0 x + b + scale * B(A(dropout(x)))
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_dist.errors import UserError
from lora_dist.inputs import excerpt
from lora_dist.merge import LoRAWeights, lora_scale, merge_weight, unmerge_weight
from lora_dist.nf4 import dequantize, frozen_linear, is_nf4, is_quantized
from lora_dist.sharding import full_shape

log = logging.getLogger(__name__)

try:  # transformers is a dependency, but keep the core importable without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "InjectionReport",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRALayer",
    "LoRALinear",
    "LoRAParam",
    "LoRAParamHost",
    "disable_adapters",
    "inject_lora",
    "language_model",
    "lora_modules",
    "lora_parameters",
    "param_targets",
]

TargetSpec = Union[list[str], str, None]

#: Attention query and value projections per architecture, as in the LoRA paper.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "opt": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "llama4_text": ["q_proj", "v_proj"],
    # Vision-language models: their language model's (inject_lora leaves the vision tower out).
    "gemma3": ["q_proj", "v_proj"],
    "mistral3": ["q_proj", "v_proj"],
    "qwen2_5_vl": ["q_proj", "v_proj"],
    "qwen3_vl": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
}

_INITS = ("kaiming", "gaussian")


class LoRAConfigError(UserError, ValueError):
    """An invalid LoRA configuration, or targets that match nothing."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LoRAConfig:
    """What to adapt and how."""

    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA input path."""
    target_modules: TargetSpec = None
    """Module-name suffixes (list), a regex matched against full names, or "all-linear". Default: the architecture's attention query/value projections.
    A single name is a regex too, matching no full name: write lora.target_modules=[q_proj], not q_proj."""
    exclude_modules: TargetSpec = None
    """Module-name suffixes (list) or a regex of modules never to adapt."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale alpha/sqrt(r) instead of alpha/r."""
    init: str = "kaiming"
    """A's init: "kaiming" (uniform, a=sqrt(5); PEFT's default) or "gaussian" (std 1/r). B is always zero."""
    layers_to_transform: list[int] | None = None
    """Only adapt these layer indices (None: all layers)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: regex on the module name -> r (PEFT semantics)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: regex on the module name -> alpha (PEFT semantics)."""
    target_parameters: list[str] | None = None
    """Parameter-name suffixes to adapt directly, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] for fused MoE experts (PEFT's target_parameters). Without target_modules only these are adapted."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.target_parameters, tuple):
            self.target_parameters = list(self.target_parameters)
        if self.target_parameters is not None:
            spec = self.target_parameters
            if not (isinstance(spec, list) and spec and all(isinstance(s, str) and s for s in spec)):
                raise LoRAConfigError(f"lora.target_parameters must be a non-empty list of parameter names like "
                                      f"mlp.experts.gate_up_proj, got {excerpt(spec)}")
            if self.dropout:
                raise LoRAConfigError(f"lora.dropout={self.dropout} cannot apply to lora.target_parameters (PEFT's "
                                      "ParamWrapper has no input to drop out); set lora.dropout=0")
        if not (_is_int(self.r) and self.r > 0):
            raise LoRAConfigError(f"lora.r must be a positive integer, got {excerpt(self.r)}")
        if not (_is_number(self.alpha) and self.alpha > 0):
            raise LoRAConfigError(f"lora.alpha must be a positive finite number, got {excerpt(self.alpha)}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise LoRAConfigError(f"lora.dropout must be a number in [0, 1), got {excerpt(self.dropout)}")
        if not isinstance(self.use_rslora, bool):
            raise LoRAConfigError(f"lora.use_rslora must be true or false, got {excerpt(self.use_rslora)}")
        if self.init not in _INITS:
            raise LoRAConfigError(f"lora.init must be one of {_INITS}, got {excerpt(self.init)}")
        for name in ("target_modules", "exclude_modules"):
            spec = getattr(self, name)
            if spec is None:
                continue
            if isinstance(spec, str):
                if spec != "all-linear":
                    try:
                        re.compile(spec)
                    except (re.error, RecursionError, OverflowError) as e:
                        raise LoRAConfigError(f"lora.{name} {excerpt(spec)} is not a valid regex: {_regex_problem(e)}"
                                              ) from None
            elif not (isinstance(spec, list) and spec and all(isinstance(s, str) and s for s in spec)):
                raise LoRAConfigError(
                    f"lora.{name} must be a non-empty list of names, a regex or 'all-linear', got {excerpt(spec)}"
                )
        if self.exclude_modules == "all-linear":
            raise LoRAConfigError("lora.exclude_modules cannot be 'all-linear'")
        if self.layers_to_transform is not None:
            if _is_int(self.layers_to_transform):
                self.layers_to_transform = [self.layers_to_transform]
            if not (isinstance(self.layers_to_transform, (list, tuple))
                    and all(_is_int(i) and i >= 0 for i in self.layers_to_transform)):
                raise LoRAConfigError(
                    "lora.layers_to_transform must be non-negative layer indices, "
                    f"got {excerpt(self.layers_to_transform)}"
                )
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise LoRAConfigError(
                    f"lora.{name} must be a mapping of module regex -> value, got {excerpt(getattr(self, name))}"
                )
        for name in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, name):
                if not isinstance(pattern, str):
                    raise LoRAConfigError(
                        f"lora.{name} keys must be module-name regexes (strings), got {excerpt(pattern)}; quote it"
                    )
                try:
                    re.compile(_pattern_regex(pattern))
                except (re.error, RecursionError, OverflowError) as e:
                    raise LoRAConfigError(f"lora.{name} key {excerpt(pattern)} is not a valid regex "
                                          f"({_regex_problem(e)}); escape special characters") from None
        for pattern, value in self.rank_pattern.items():
            if not (_is_int(value) and value > 0):
                raise LoRAConfigError(
                    f"lora.rank_pattern[{excerpt(pattern)}] must be a positive integer, got {excerpt(value)}"
                )
        for pattern, value in self.alpha_pattern.items():
            if not (_is_number(value) and value > 0):
                raise LoRAConfigError(
                    f"lora.alpha_pattern[{excerpt(pattern)}] must be a positive finite number, got {excerpt(value)}"
                )

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha of one module, honouring rank_pattern / alpha_pattern."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.alpha),
        )


def _regex_problem(e: BaseException) -> str:
    return str(e) if isinstance(e, re.error) else "nested or repeated too deeply"


def _pattern_regex(key: str) -> str:
    """PEFT's reading of a rank/alpha pattern key: it matches a module name's tail after a dot."""
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module_name):
            return value
    return default


def _is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


#: ``nn.Linear`` subclasses with a forward of their own that is the plain projection (Falcon's ``x @ W.T + b``).
PLAIN_PROJECTIONS = ("FalconLinear",)


def _is_adaptable(module: nn.Module) -> bool:
    """A linear projection: ``nn.Linear``, a subclass that keeps its forward or one of :data:`PLAIN_PROJECTIONS`
    (not another subclass with a forward of its own, such as Llama 4's router, which returns more than the
    projection: LoRA would replace that forward), or GPT-2's ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward or type(module).__name__ in PLAIN_PROJECTIONS
    return _is_conv1d(module)


#: ``self.<child>.weight`` used as a value in a module's code (not for its dtype, device or shape).
_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b(?!\s*\.\s*(?:dtype|device|shape|size|ndim|is_\w+|data_ptr)\b)")


@functools.lru_cache(maxsize=None)
def _weights_read(cls: type) -> frozenset[str]:
    """The children whose ``.weight`` the methods of module class ``cls`` (and of its bases outside torch) use as a
    value, not calling the child: weight initialization aside."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for attr, fn in vars(klass).items():
            if "init" in attr or not inspect.isfunction(fn):
                continue
            try:
                names |= set(_WEIGHT_READ.findall(inspect.getsource(fn)))
            except (OSError, TypeError):  # no source (a compiled or generated method)
                continue
    return frozenset(names)


def read_by_weight(model: nn.Module) -> set[str]:
    """The linear layers of Mamba mixers (modules holding ``A_log``, ``D`` and a ``conv1d``) whose weight the mixer's
    code uses directly, without calling them: LoRA there has no effect in that path. A Mamba-2 mixer hands
    ``out_proj.weight`` to its fused scan kernel on GPUs with mamba-ssm or the Hub's kernels (Mamba 1 also
    ``x_proj`` and ``dt_proj``; Jamba multiplies by ``dt_proj.weight`` everywhere); PEFT refuses ``out_proj`` in
    some of these models for that reason. Other modules' paths that read a weight are left alone: they are off by
    default (Bloom's ``pretraining_tp`` slices)."""
    out = set()
    for name, module in model.named_modules():
        mixer = hasattr(module, "A_log") and hasattr(module, "D") and isinstance(getattr(module, "conv1d", None),
                                                                              nn.Module)
        read = _weights_read(type(module)) if mixer else frozenset()
        if read:
            out |= {f"{name}.{child}" if name else child for child, sub in module.named_children()
                    if child in read and isinstance(sub, nn.Linear)}
    return out


def language_model(model: nn.Module) -> str | None:
    """The name of a vision-language model's language model (``model.language_model``), whose linear layers
    ``all-linear`` and name lists adapt; None for a language model (or one whose decoder is not found)."""
    from lora_dist.model_dir import text_config

    config = getattr(model, "config", None)
    get_decoder = getattr(model, "get_decoder", None)
    if config is None or text_config(config) is config or not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except Exception:  # an architecture without one
        return None
    return next((name for name, m in model.named_modules() if m is decoder and name), None)


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether floating ``dtype`` has fewer bits than floating ``than`` (bf16/fp16 vs fp32)."""
    return dtype.is_floating_point and than.is_floating_point and torch.finfo(dtype).bits < torch.finfo(than).bits


class LoRALayer(nn.Module):
    """What every LoRA adapter has: ``lora_A``/``lora_B`` (``nn.Linear``, PEFT's names and shapes), the scale,
    the ``merged``/``disabled`` flags, and the init. The optimizer, checkpoints and adapters see only these."""

    r: int
    alpha: float
    scale: float
    in_features: int
    out_features: int
    init: str
    #: Experts the adapter spans: ``lora_A`` has ``num_experts * r`` rows (1 for a linear layer).
    num_experts: int = 1
    fan_in_fan_out: bool = False

    def initialize_parameters(self, generator: torch.Generator | None = None) -> None:
        """A: kaiming-uniform (a=sqrt(5)) or N(0, (1/r)^2); B: zeros, so the layer starts as the base."""
        with torch.no_grad():
            # Drawn on the CPU in fp32, so a seeded generator gives the same A on every rank and device.
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            if self.init == "gaussian":
                a.normal_(0.0, 1.0 / self.r, generator=generator)
            else:
                # kaiming_uniform_(a=sqrt(5)) written out so it can take a generator.
                gain = math.sqrt(2.0 / (1 + 5))
                bound = math.sqrt(3.0) * gain / math.sqrt(self.in_features)
                a.uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def _make_factors(self, weight: torch.Tensor, r: int, lora_dtype: torch.dtype) -> None:
        """``lora_A``/``lora_B`` next to ``weight`` (on meta while the base is; on the CPU for a shard left
        empty), not merged, not disabled, and initialized unless on meta."""
        device = weight.device if weight.device.type == "meta" or weight.numel() else None
        rows = r * self.num_experts
        self.lora_A = nn.Linear(self.in_features, rows, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(rows, self.out_features, bias=False, device=device, dtype=lora_dtype)
        self.merged = False
        self.disabled = False
        if weight.device.type != "meta":
            self.initialize_parameters()

    def base_weight(self) -> torch.Tensor:
        """The frozen base tensor the adapter updates (sharded or not)."""
        raise NotImplementedError

    def lora_weights(self) -> LoRAWeights:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (fp32 math, NaN/Inf checked)."""
        if not self.merged:
            if is_quantized(self.base_weight()):
                raise LoRAConfigError(f"{self.weight_name} is NF4 (model.quantize): an adapter cannot be folded into "
                                      "4-bit weights; the merged export merges into the dequantized base")
            self._fold(merge_weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if self.merged:
            self._fold(lambda w, lora, name: unmerge_weight(w, lora, name=name))
            self.merged = False

    def _fold(self, fold) -> None:
        """``weight.data = fold(weight, lora, name)``, a stack of experts seen as ``(E, out * in)``."""
        weight, lora = self.base_weight(), self.lora_weights()
        rows = (lora.num_experts, -1) if lora.num_experts else tuple(weight.shape)
        weight.data = fold(weight.data.reshape(rows), lora, name=self.weight_name).reshape(weight.shape)

    @property
    def weight_name(self) -> str:
        """How merge errors name the base weight."""
        return "weight"


#: Devices where ``F.dropout`` runs torch's fused kernel (``native_dropout``): ``at::dropout``'s own test (a
#: renamed PrivateUse1 backend reports its own name).
_FUSED_DROPOUT_DEVICES = ("cuda", "xpu", "lazy", "privateuseone", torch._C._get_privateuse1_backend_name())


def _dropout(flat: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``flat`` dropped out as ``F.dropout(flat, p)`` drops it on its device, the same mask from the same generator
    state (for the layer's contiguous input: its flat view): ``(output, scaled mask or None, bool mask or None)``.

    Where torch runs its fused dropout kernel (CUDA, XPU: ``at::dropout`` calls ``native_dropout`` there) that
    kernel, keeping its bool mask; elsewhere (the CPU) the mask drawn as ``at::dropout`` draws it there, kept,
    scaled by ``1 / (1 - p)``, in ``flat``'s dtype.
    """
    if not p:
        return flat, None, None
    if flat.device.type in _FUSED_DROPOUT_DEVICES and flat.numel():
        out, mask = torch.native_dropout(flat, p, True)
        return out, None, mask
    noise = torch.empty_like(flat).bernoulli_(1.0 - p).div_(1.0 - p)
    return flat * noise, noise, None


class _LoRALinearFunction(torch.autograd.Function):
    """``x @ W.T + bias + (scale * dropout(x) @ A.T) @ B.T`` for a frozen ``W`` (plain, or NF4 dequantized for each
    matmul), one autograd node for the whole adapted layer.

    It computes what autograd computes for the layer written as separate ops - the LoRA path in ``x``'s dtype
    (the fp32 params cast, their grads cast back), the scale on the rank-r hidden, the dropout mask drawn as
    ``nn.Dropout`` draws it on that device (:func:`_dropout`) - and keeps the same tensors for backward (the LoRA
    path's input, the ``tokens x r`` hidden, and with dropout its mask), with two passes over activations fewer per
    call: the update is accumulated into the base's output by its matmul (``addmm_``) instead of added after, and
    in backward the LoRA path's input gradient into the base's instead of summed by autograd.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        lora_x, noise, mask = _dropout(flat, dropout)
        base = dequantize(weight, x.dtype)  # the weight itself unless NF4
        hidden = (lora_x @ lora_a.to(x.dtype).t()).mul_(scale)
        out = F.linear(x, base, None if bias is None else bias.to(x.dtype))  # x's shape, not a view
        out.view(-1, out.shape[-1]).addmm_(hidden, lora_b.to(x.dtype).t())
        ctx.save_for_backward(lora_x, weight, lora_a, lora_b, hidden, noise, mask)
        ctx.scale, ctx.shape, ctx.dropout = scale, x.shape, dropout
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lora_x, weight, lora_a, lora_b, hidden, noise, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_hidden = (g @ lora_b.to(g.dtype)).mul_(ctx.scale)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_a = (grad_hidden.t() @ lora_x).to(lora_a.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ hidden).to(lora_b.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = g @ dequantize(weight, g.dtype)
            if noise is None and mask is None:
                grad_x.addmm_(grad_hidden, lora_a.to(g.dtype))
            elif mask is None:  # back through the dropout (its kept entries, scaled), rounded as autograd rounds it
                grad_x += (grad_hidden @ lora_a.to(g.dtype)).mul_(noise)
            else:  # the backward of torch's fused dropout kernel, as autograd calls it
                grad_x += torch.ops.aten.native_dropout_backward(grad_hidden @ lora_a.to(g.dtype), mask,
                                                                1.0 / (1.0 - ctx.dropout))
            grad_x = grad_x.view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


class LoRALinear(LoRALayer):
    """A linear layer with a low-rank adapter; the base ``weight``/``bias`` keep their names.

    Args:
        weight: the frozen base weight, ``(out, in)``, or ``(in, out)`` with ``fan_in_fan_out``.
        bias: the frozen base bias or ``None``.
        r: rank.
        alpha: scaling numerator.
        dropout: dropout probability on the LoRA input.
        use_rslora: scale by ``alpha / sqrt(r)``.
        fan_in_fan_out: the weight is stored transposed (GPT-2 ``Conv1D``).
        init: ``"kaiming"`` or ``"gaussian"`` for ``lora_A``.
        lora_dtype: dtype of the LoRA params (fp32 by default, whatever the base dtype).

    The LoRA path computes in the dtype of its input when that is narrower than
    ``lora_dtype`` (bf16/fp16 activations, fp32 params): the params are cast for the
    matmuls, so their grads stay fp32 and no fp32 copy of the input is kept for backward.
    Otherwise the input is cast to ``lora_dtype`` (fp32 inputs: plain fp32 math).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        init: str = "kaiming",
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        shape = full_shape(weight)
        out_features, in_features = shape[::-1] if fan_in_fan_out else shape
        if r <= 0:  # r > min(in, out) is allowed, as in PEFT: a 64->1 MoE gate under all-linear, say
            raise LoRAConfigError(f"lora.r={r} must be at least 1 for a {in_features}->{out_features} layer")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        self.init = init
        self.weight = weight
        self.weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._make_factors(weight, r, lora_dtype)

    @classmethod
    def from_base(cls, base: nn.Module, **kwargs) -> "LoRALinear":
        """Wrap an ``nn.Linear`` or ``Conv1D``, reusing its parameter objects."""
        return cls(base.weight, base.bias, fan_in_fan_out=_is_conv1d(base), **kwargs)

    def base_weight(self) -> torch.Tensor:
        return self.weight

    def lora_weights(self) -> LoRAWeights:
        return LoRAWeights(self.lora_A.weight, self.lora_B.weight, self.scale, self.fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.T if self.fan_in_fan_out else self.weight
        if self.merged or self.disabled:
            return frozen_linear(x, weight, self.bias)  # F.linear, also for an NF4 base (model.quantize)
        if self._fusable(x, weight):
            drop = self.lora_dropout
            dropout = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            return _LoRALinearFunction.apply(x, weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scale,
                                             dropout)
        result = frozen_linear(x, weight, self.bias)
        lora_dtype = self.lora_A.weight.dtype
        if _narrower(x.dtype, lora_dtype):
            # bf16/fp16 activations, fp32 LoRA params: compute in the activations' dtype, as autocast
            # would. Only the (small) weights are cast; the cast is differentiable, so the params and
            # their grads stay fp32, and backward keeps no fp32 copy of x per adapted projection.
            lora_x = self.lora_dropout(x)
            hidden = F.linear(lora_x, self.lora_A.weight.to(x.dtype))
            update = F.linear(hidden * self.scale, self.lora_B.weight.to(x.dtype))
        else:
            lora_x = self.lora_dropout(x).to(lora_dtype)
            # The scale applies to the rank-r hidden (tokens x r), not to the update (tokens x out): the same
            # product, a pass over r columns instead of out, in forward and in backward.
            update = self.lora_B(self.lora_A(lora_x) * self.scale)
        return result + update.to(result.dtype)

    def _fusable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether :class:`_LoRALinearFunction` computes this call: no autocast, a frozen plain base weight (or NF4)
        in ``x``'s dtype, LoRA params at least as wide as ``x``. Otherwise the layer runs as separate autograd ops
        (the same math)."""
        bias = self.bias
        return (type(x) is torch.Tensor
                and not torch.is_autocast_enabled(x.device.type) and not weight.requires_grad
                and (is_nf4(weight) or (type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype == x.dtype))
                and not (self.fan_in_fan_out and is_nf4(weight))
                and (bias is None or (type(bias) in (torch.Tensor, nn.Parameter) and not bias.requires_grad))
                and not _narrower(self.lora_A.weight.dtype, x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scale={self.scale:g}, fan_in_fan_out={self.fan_in_fan_out}"
        )


class LoRAParam(LoRALayer):
    """A low-rank adapter on one parameter of a module: PEFT's ``target_parameters`` (its ``ParamWrapper``).

    The base parameter stays where it is, under its own name (``mlp.experts.gate_up_proj``);
    this module lives in the owner's ``lora`` dict (``mlp.experts.lora.gate_up_proj``), and
    the owner's forward sees ``W + scale * B @ A`` in place of ``W`` (:class:`LoRAParamHost`).
    A 3-D ``(E, out, in)`` stack of experts (``(E, in, out)`` where the owner is
    ``is_transposed``) gets PEFT's shapes: ``lora_A`` ``(E * r, in)``, ``lora_B``
    ``(out, r * E)`` (:mod:`lora_dist.merge`); a 2-D ``(out, in)`` weight gets a linear layer's.

    Args:
        owner: the module holding the parameter.
        parameter_name: its attribute name there.
        r, alpha, use_rslora, init, lora_dtype: as for :class:`LoRALinear`.
    """

    def __init__(self, owner: nn.Module, parameter_name: str, r: int, alpha: float, use_rslora: bool = False,
                 init: str = "kaiming", lora_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()

        weight = getattr(owner, parameter_name)
        shape = full_shape(weight)
        if len(shape) not in (2, 3):
            raise LoRAConfigError(f"{parameter_name} has shape {shape}; lora.target_parameters adapts 2-D weights "
                                  "and 3-D (experts, ...) stacks only")
        self.stacked = len(shape) == 3
        self.transposed = self.stacked and bool(getattr(owner, "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        d1, d2 = shape[-2:]
        self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)
        if r <= 0:
            raise LoRAConfigError(f"lora.r={r} must be at least 1 for {parameter_name} {shape}")
        self.parameter_name = parameter_name
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.fan_in_fan_out = self.transposed
        self.init = init
        self._owner = weakref.ref(owner)  # not a submodule: the owner holds this module
        weight.requires_grad_(False)
        self._make_factors(weight, r, lora_dtype)

    @property
    def weight_name(self) -> str:
        return self.parameter_name

    def base_weight(self) -> torch.Tensor:
        return getattr(self._owner(), self.parameter_name)

    def lora_weights(self) -> LoRAWeights:
        experts = self.num_experts if self.stacked else 0
        return LoRAWeights(self.lora_A.weight, self.lora_B.weight, self.scale, self.fan_in_fan_out, experts)

    def adapted(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + scale * B @ A``, differentiable in A and B, computed as PEFT does (in ``weight``'s dtype)."""
        e = self.num_experts
        a = self.lora_A.weight.reshape(e, -1, self.in_features)  # (E, r, in)
        b = self.lora_B.weight.reshape(self.out_features, -1, e).permute(2, 0, 1)  # (E, out, r)
        lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if self.transposed else (b, a)
        stacked = weight if weight.dim() == 3 else weight.unsqueeze(0)
        out = torch.baddbmm(stacked, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=self.scale)
        return out if weight.dim() == 3 else out.squeeze(0)

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, "
                f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale:g}")


class LoRAParamHost:
    """Mixed into the class of a module whose parameters carry :class:`LoRAParam` adapters (its ``lora`` dict).

    Its forward runs the module's own forward with each adapted parameter replaced by
    ``W + delta`` for the call, then puts the parameter back: whatever FSDP2 or ZeRO-3
    placed there (the gathered weight) is what is adapted and what is restored.
    """

    lora: nn.ModuleDict

    def forward(self, *args, **kwargs):
        active = [m for m in self.lora.values() if not (m.merged or m.disabled)]
        params = self._parameters
        saved = {m.parameter_name: params[m.parameter_name] for m in active}
        try:
            for m in active:
                params[m.parameter_name] = m.adapted(saved[m.parameter_name])
            return super().forward(*args, **kwargs)
        finally:
            params.update(saved)


_HOST_CLASSES: dict[type, type] = {}


def _host_class(cls: type) -> type:
    """``cls`` with :class:`LoRAParamHost`'s forward, one class per base class."""
    if issubclass(cls, LoRAParamHost):
        return cls
    if cls not in _HOST_CLASSES:
        _HOST_CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRAParamHost, cls), {})
    return _HOST_CLASSES[cls]


@dataclass
class InjectionReport:
    """What :func:`inject_lora` did."""

    matched: list[str]
    trainable_params: int
    all_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.all_params, 1)

    def summary(self) -> str:
        return (
            f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )

    def __str__(self) -> str:
        return f"LoRA on {len(self.matched)} modules; {self.summary()}"


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block|decoder\.layers)\.(\d+)(?:\.|$)")
_ANY_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def _layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.search("." + name) or _ANY_INDEX.search("." + name)
    return int(m.group(1)) if m else None


def _matches(spec: TargetSpec, name: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _resolve_targets(model: nn.Module, config: LoRAConfig) -> TargetSpec:
    if config.target_modules is not None:
        return config.target_modules
    if config.target_parameters is not None:
        return None  # PEFT: target_parameters alone adapt no module
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise LoRAConfigError(
        f"no default LoRA targets for model type {model_type!r}; set lora.target_modules "
        "(module-name suffixes, a regex, or 'all-linear')"
    )


def _selected(config: LoRAConfig, module_name: str) -> bool:
    """Not excluded, and in ``layers_to_transform`` where that is set."""
    if _matches(config.exclude_modules, module_name):
        return False
    return config.layers_to_transform is None or _layer_index(module_name) in config.layers_to_transform


def _indices(values: list[int]) -> str:
    """``[0, 1, 2, 3]`` -> ``0-3``; ``[0, 2]`` -> ``0, 2``."""
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def _filtered_out(config: LoRAConfig, key: str, matched: list[str], what: str) -> str:
    """Why ``lora.<key>``'s matches (``what``: ``"4 linear layers"``) are all left out, ``matched`` being the
    module names ``_selected`` refused: the ``exclude_modules`` entries and the ``layers_to_transform`` indices
    that removed them, and the fix."""
    excluded = [n for n in matched if _matches(config.exclude_modules, n)]
    reasons, fixes = [], []
    if excluded:
        ex = config.exclude_modules
        if isinstance(ex, str):
            by, fix = f"lora.exclude_modules={excerpt(ex)}", "change lora.exclude_modules"
        else:
            entries = [e for e in ex if any(n == e or n.endswith("." + e) for n in excluded)]
            by, fix = (f"lora.exclude_modules entry {' and '.join(entries)}",
                       f"drop {', '.join(entries)} from lora.exclude_modules")
        more = f" and {len(excluded) - 1} more" if len(excluded) > 1 else ""
        reasons.append(f"{by} removes {excluded[0]}{more}")
        fixes.append(fix)
    if len(excluded) < len(matched):
        layers = sorted({i for n in matched if (i := _layer_index(n)) is not None})
        where = f"they lie in layers {_indices(layers)}" if layers else "they lie in no numbered layer"
        reasons.append(f"lora.layers_to_transform={excerpt(config.layers_to_transform)} keeps "
                       f"{'none of the rest' if excluded else 'none of them'} ({where})")
        fixes.append(f"choose lora.layers_to_transform among {_indices(layers)} or drop it" if layers
                     else "drop lora.layers_to_transform")
    return (f"lora.{key}={excerpt(getattr(config, key))} matched {what}, but " + "; ".join(reasons) + "; "
            + ", and ".join(fixes))


def _param_suffix(name: str) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> ``mlp.experts.down_proj`` (what target_parameters names)."""
    m = _LAYER_INDEX.search("." + name)
    return name[m.end() - 1:] if m else name


def param_targets(model: nn.Module, target_parameters: list[str] | None) -> dict[str, list[str]]:
    """Owner module name -> the names of its parameters ``target_parameters`` matches (PEFT's rule: the full
    name equals an entry or ends with ``.`` + it), in the owner's registration order (PEFT's nesting order)."""
    owners: dict[str, list[str]] = {}
    if not target_parameters:
        return owners
    factors = {id(f) for m in model.modules() if isinstance(m, LoRALayer) for f in (m.lora_A, m.lora_B)}
    for module_name, module in model.named_modules():
        if isinstance(module, LoRAParam) or id(module) in factors:
            continue
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if any(full == t or full.endswith("." + t) for t in target_parameters):
                owners.setdefault(module_name, []).append(pname)
    return owners


def _param_choices(model: nn.Module, config: LoRAConfig, layers: list[str]) -> dict[str, list[str]]:
    """The parameters to adapt, by owner (none inside ``layers``, the linear layers being adapted);
    refuses what PEFT refuses, in one line."""
    found = param_targets(model, config.target_parameters)
    owners = {o: ps for o, ps in found.items() if _selected(config, o)}
    if found and not owners:
        count = sum(map(len, found.values()))
        raise LoRAConfigError(_filtered_out(config, "target_parameters", list(found), f"{count} parameters"))
    if config.target_parameters is not None and not owners:
        stacks = sorted({_param_suffix(n) for n, p in model.named_parameters() if len(full_shape(p)) == 3})
        raise LoRAConfigError(
            f"lora.target_parameters={excerpt(config.target_parameters)} matched no parameter; "
            + (f"the model's 3-D (expert) parameters are {stacks}" if stacks else "the model has no 3-D (expert) "
               "parameters; adapt its linear layers with lora.target_modules")
        )
    for owner, names in owners.items():
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, LoRALinear) or owner in layers:
            raise LoRAConfigError(f"lora.target_parameters matches {owner}.{names[0]}, a weight of a layer "
                                  "lora.target_modules already adapts; target it one way only")
        if hasattr(module, "lora"):
            raise LoRAConfigError(f"{owner} already has a 'lora' attribute; inject_lora was called twice")
        for pname in names:
            ndim = len(full_shape(getattr(module, pname)))
            if ndim not in (2, 3):
                raise LoRAConfigError(f"lora.target_parameters matches {owner}.{pname}, a {ndim}-D parameter; "
                                      "only 2-D weights and 3-D (experts, ...) stacks can be adapted")
    return owners


def inject_lora(model: nn.Module, config: LoRAConfig, lora_dtype: torch.dtype = torch.float32) -> InjectionReport:
    """Adapt the targeted linear layers (:class:`LoRALinear`) and parameters (:class:`LoRAParam`), in place.

    Every base parameter is frozen. Works on a meta-device skeleton: the LoRA
    params are then created on meta too and initialized after materialization.

    Args:
        model: any module built of ``nn.Linear`` / ``Conv1D`` projections (and, for
            ``target_parameters``, modules holding the parameters, such as fused MoE experts).
        config: what to adapt.
        lora_dtype: dtype of the LoRA params.

    Returns:
        The matched module (and parameter) names and parameter counts.

    Raises:
        LoRAConfigError: nothing matched (the message lists the linear layers, or the
            3-D parameters), or ``exclude_modules`` and ``layers_to_transform`` left none of the matches (the
            message names which entries, and the layers the matches lie in). ``r`` may exceed a matched layer's
            smaller side, as in PEFT (a 64->1 MoE gate under ``all-linear``): its update then has rank
            ``min(in, out)``.
    """
    targets = _resolve_targets(model, config)
    head = _output_head(model)
    # A vision-language model trains on text here: all-linear and name lists stay in its language model (a regex
    # adapts what it names).
    text = language_model(model) if not isinstance(targets, str) or targets == "all-linear" else None
    linear_names: list[str] = []
    others: list[str] = []  # Linear subclasses with a forward of their own
    matched: list[str] = []  # targeted, before exclude_modules and layers_to_transform
    chosen: list[str] = []
    fused = read_by_weight(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            raise LoRAConfigError(f"{name} already has a LoRA adapter; inject_lora was called twice")
        if not _is_adaptable(module):
            if isinstance(module, nn.Linear):
                others.append(name)
            continue
        linear_names.append(name)
        if targets is None or (text is not None and not name.startswith(text + ".")):
            continue
        if targets == "all-linear":
            if module is head or name.split(".")[-1] in ("lm_head",) or name in fused:
                continue
        elif not _matches(targets, name):
            continue
        matched.append(name)
        if _selected(config, name):
            chosen.append(name)
    bypassed = sorted(n for n in chosen if n in fused)
    if bypassed:
        log.warning("LoRA on %s (and %d more): the module holding it uses its weight directly in some path (a fused "
                    "Mamba kernel on GPUs), where this LoRA has no effect; all-linear leaves such layers out, "
                    "lora.exclude_modules=[%s] does too", bypassed[0], len(bypassed) - 1,
                    ",".join(sorted({n.split(".")[-1] for n in bypassed})))
    if targets is not None and matched and not chosen:
        raise LoRAConfigError(_filtered_out(config, "target_modules", matched, f"{len(matched)} linear layers"))
    if targets is not None and not chosen:
        shown = sorted({n.split(".")[-1] for n in linear_names})
        as_list = isinstance(targets, str) and targets != "all-linear" and any(
            _matches([targets], n) for n in linear_names)
        raise LoRAConfigError(
            f"lora.target_modules={excerpt(targets)} matched no linear layer; "
            + (f"a string is a regex on full module names; write lora.target_modules=[{targets}] (a list of names)"
               if as_list else f"the model's linear layers are named {shown} (full names like {linear_names[:3]})")
            + (f"; Linear subclasses with a forward of their own are not adapted: "
               f"{sorted({n.split('.')[-1] for n in others})}" if others else "")
        )
    params = _param_choices(model, config, chosen)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        r, alpha = config.rank_and_alpha(name)
        try:
            layer = LoRALinear.from_base(
                getattr(parent, child),
                r=r,
                alpha=alpha,
                dropout=config.dropout,
                use_rslora=config.use_rslora,
                init=config.init,
                lora_dtype=lora_dtype,
            )
        except LoRAConfigError as e:
            raise LoRAConfigError(f"{name}: {e}") from None
        setattr(parent, child, layer)
    for owner, names in params.items():
        module = model.get_submodule(owner) if owner else model
        adapters = nn.ModuleDict()
        for pname in names:
            r, alpha = config.rank_and_alpha(f"{owner}.{pname}")
            adapters[pname] = LoRAParam(module, pname, r=r, alpha=alpha, use_rslora=config.use_rslora,
                                        init=config.init, lora_dtype=lora_dtype)
        module.lora = adapters
        module.__class__ = _host_class(type(module))
    model.lora_config = config  # read by save_adapter
    # Whole tensors' sizes, also where ZeRO-3 partitioned them as they were created (zero.Init).
    trainable = sum(math.prod(full_shape(p)) for p in model.parameters() if p.requires_grad)
    total = sum(math.prod(full_shape(p)) for p in model.parameters())
    matched = chosen + [f"{o}.{p}" for o, ps in params.items() for p in ps]
    return InjectionReport(matched, trainable, total)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(name, module)`` for every LoRA adapter, in registration order: ``LoRALinear`` layers under their
    own names, ``LoRAParam`` s as ``<owner>.lora.<parameter>``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B parameters of ``model``, in a deterministic order."""
    params: list[nn.Parameter] = []
    for _, module in lora_modules(model):
        params += [module.lora_A.weight, module.lora_B.weight]
    return params


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base model: every LoRA layer skips its adapter.

    Merged layers are unmerged for the duration and merged again on exit (as PEFT does).
    """
    layers = [m for _, m in lora_modules(model)]
    previous = [m.disabled for m in layers]
    merged = [m for m in layers if m.merged]
    for m in merged:
        m.unmerge()
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m.disabled = p
        for m in merged:
            m.merge()
