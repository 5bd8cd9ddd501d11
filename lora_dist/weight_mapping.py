"""Where a model param's values are in a base model dir: one tensor, or several converted by transformers' mapping.

transformers 5 holds some weights in another form in memory than in the files
it reads. Mixture-of-experts models are the main case: ``MixtralForCausalLM``
has one fused ``mlp.experts.gate_up_proj`` of shape ``(E, 2I, H)`` per layer,
while the checkpoint on disk keeps the Hub's per-expert tensors
``block_sparse_moe.experts.N.w1/w3.weight`` (each ``(I, H)``). transformers
converts between the two at load and save time with a data-driven mapping per
model type (``transformers.conversion_mapping``): ``WeightRenaming`` entries
rename keys, ``WeightConverter`` entries assemble a param from several keys with
a list of operations (``MergeModulelist(dim=0)`` stacks the experts' tensors,
``Concatenate(dim=1)`` joins gate and up).

lora_dist reads that mapping as data (the list transformers itself would use
for this model, :func:`model_transforms`) and never builds the fused tensor.
:class:`WeightMap` names a :class:`TensorSource` for each model param: a
:class:`FileTensor` (one tensor of the dir, the dense case) or a tree of
:class:`Concat` nodes over the per-expert :class:`FileTensor` s. Every source
reads any flat element range of the row-major tensor it stands for
(:meth:`TensorSource.read_flat`), touching only the files' rows that hold those
elements: an FSDP2 ``Shard(0)`` block of rows (whole experts) or a ZeRO-3
partition cutting experts and rows anywhere reads only its own experts' bytes.
A converter that only transposes the last two dims of one tensor (Qwen3-VL-MoE's
experts: the Hub stores ``gate_up_proj`` as ``(E, H, 2I)``, transformers holds
``(E, 2I, H)``) gives a :class:`Transposed` source; a ``check_dims`` transpose
applies, as in transformers, only where the stored shape is not the model's, so
the param's shape is needed (:meth:`WeightMap.of` reads it from the model). Other
operations (``Chunk``, ``Interleave``, a ``Transpose`` after other ops, quantizer
ops...) are refused in one line naming them. Nothing changes the files: the merged
export writes the base's own keys and shapes, so a converted model is written back
in the layout it was read in (a transposed tensor merged with the adapter's
transpose).
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from lora_dist.model_dir import ModelDir, ModelDirError
from lora_dist.sharding import full_shape

__all__ = [
    "Concat", "FileTensor", "Run", "TensorSource", "Transposed", "View", "WeightMap", "WeightMappingError",
    "model_transforms",
]

#: The conversion operations lora_dist reads lazily (transformers' class names).
SUPPORTED_OPS = ("MergeModulelist", "Concatenate")


class WeightMappingError(ModelDirError):
    """A param transformers converts from the checkpoint in a way lora_dist cannot read piecewise."""


def _natural_key(name: str) -> list:
    """Sort key putting ``experts.2`` before ``experts.10`` (the order transformers collects experts in)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Run:
    """Flat elements ``[start, start + numel)`` of a tensor are elements ``[key_start, key_start + numel)`` of
    the dir's tensor ``key`` (row-major, both)."""

    start: int
    key: str
    key_start: int
    numel: int


class TensorSource:
    """A tensor of known shape, read a flat element range at a time from a model dir's files."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements of the whole tensor."""
        return math.prod(self.shape)

    def keys(self) -> list[str]:
        """The base dir's tensors this one is read from."""
        raise NotImplementedError

    def describe(self) -> str:
        """How errors name it."""
        raise NotImplementedError

    def read_flat(self, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the row-major flattened tensor, reading only the rows that hold them."""
        raise NotImplementedError

    def read(self) -> torch.Tensor:
        """The whole tensor (for a param a rank holds whole)."""
        return self.read_flat(0, self.numel).reshape(self.shape)

    def runs(self) -> list[Run]:
        """Where every element is stored: contiguous runs, in order, covering the flattened tensor."""
        raise NotImplementedError


class FileTensor(TensorSource):
    """One tensor of the base dir, as it is stored.

    Args:
        base: the model dir.
        key: the tensor's name in it.
    """

    def __init__(self, base: ModelDir, key: str) -> None:
        self.base, self.key = base, key
        self.shape = base.shape(key)

    def keys(self) -> list[str]:
        return [self.key]

    def describe(self) -> str:
        return self.key

    def read_flat(self, start: int, end: int) -> torch.Tensor:
        return self.base.read_flat(self.key, start, end)

    def runs(self) -> list[Run]:
        return [Run(0, self.key, 0, self.numel)]

    def read(self) -> torch.Tensor:
        return self.base.read(self.key)


class View(TensorSource):
    """``part`` seen with another shape of the same size (a stacked expert is its tensor with a leading 1)."""

    def __init__(self, part: TensorSource, shape: tuple[int, ...]) -> None:
        if math.prod(shape) != part.numel:
            raise ValueError(f"cannot view {part.describe()} {part.shape} as {shape}")
        self.part, self.shape = part, tuple(shape)

    def keys(self) -> list[str]:
        return self.part.keys()

    def describe(self) -> str:
        return self.part.describe()

    def read_flat(self, start: int, end: int) -> torch.Tensor:
        return self.part.read_flat(start, end)

    def runs(self) -> list[Run]:
        return self.part.runs()


class Concat(TensorSource):
    """``torch.cat(parts, dim)``, never built whole: a flat range is read part by part.

    In the row-major result, each of the ``prod(shape[:dim])`` outer slabs holds,
    in order, one contiguous run of every part (``parts[i].shape[dim] *
    prod(shape[dim + 1:])`` elements); whole slabs are read as one range of each
    part, a partial slab at either end part by part.

    Args:
        parts: equal shapes except along ``dim``.
        dim: the dimension they are joined along (negative counts from the end).
        name: how errors name the result.

    Raises:
        ValueError: no parts, or shapes that cannot be joined along ``dim``.
    """

    def __init__(self, parts: list[TensorSource], dim: int, name: str = "") -> None:
        if not parts:
            raise ValueError(f"{name}: nothing to concatenate")
        ndim = len(parts[0].shape)
        if not -ndim <= dim < ndim:
            raise ValueError(f"{name}: dim {dim} is out of range for shape {parts[0].shape}")
        dim %= ndim
        first = parts[0].shape
        for p in parts:
            if len(p.shape) != ndim or p.shape[:dim] != first[:dim] or p.shape[dim + 1:] != first[dim + 1:]:
                raise ValueError(f"{name}: cannot concatenate {p.describe()} {p.shape} with "
                                 f"{parts[0].describe()} {parts[0].shape} along dim {dim}")
        self.parts, self.dim, self.name = list(parts), dim, name
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape = tuple(shape)
        inner = math.prod(shape[dim + 1:])
        self._runs = [p.shape[dim] * inner for p in parts]  # each part's elements per slab
        self._slab = sum(self._runs)
        self._offsets = [sum(self._runs[:i]) for i in range(len(parts))]

    def keys(self) -> list[str]:
        return [k for p in self.parts for k in p.keys()]

    def describe(self) -> str:
        keys = self.keys()
        return f"{self.name} (from {len(keys)} checkpoint tensors: {keys[0]}, ...)"

    def runs(self) -> list[Run]:
        out: list[Run] = []
        parts = [(p.runs(), run, offset) for p, run, offset in zip(self.parts, self._runs, self._offsets)]
        starts = [[r.start for r in runs] for runs, _, _ in parts]
        for slab in range(self.numel // self._slab if self._slab else 0):
            for (runs, run, offset), first in zip(parts, starts):
                lo, hi = slab * run, (slab + 1) * run  # this slab's elements of the part
                i = bisect.bisect_right(first, lo) - 1
                while i < len(runs) and runs[i].start < hi:
                    r = runs[i]
                    a, b = max(lo, r.start), min(hi, r.start + r.numel)
                    if a < b:
                        out.append(Run(slab * self._slab + offset + a - lo, r.key, r.key_start + a - r.start, b - a))
                    i += 1
        return out

    def _within_slab(self, slab: int, lo: int, hi: int) -> list[torch.Tensor]:
        """Elements ``[lo, hi)`` of slab ``slab`` (offsets inside the slab)."""
        out = []
        for part, run, offset in zip(self.parts, self._runs, self._offsets):
            a, b = max(lo, offset), min(hi, offset + run)
            if a < b:
                out.append(part.read_flat(slab * run + a - offset, slab * run + b - offset))
        return out

    def read_flat(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start <= end <= self.numel:
            raise ValueError(f"{self.name}: range [{start}, {end}) is outside its {self.numel} elements")
        if start == end:
            return self.parts[0].read_flat(0, 0)
        slab = self._slab
        first, last = start // slab, (end - 1) // slab
        if first == last:
            return torch.cat(self._within_slab(first, start - first * slab, end - first * slab))
        pieces = []
        o1 = first if start == first * slab else first + 1
        o2 = last + 1 if end == (last + 1) * slab else last
        if o1 > first:  # partial first slab
            pieces += self._within_slab(first, start - first * slab, slab)
        if o2 > o1:  # whole slabs: one range of each part
            blocks = [p.read_flat(o1 * run, o2 * run).reshape(o2 - o1, run) for p, run in zip(self.parts, self._runs)]
            pieces.append(torch.cat(blocks, dim=1).reshape(-1))
        if o2 <= last:  # partial last slab
            pieces += self._within_slab(last, 0, end - last * slab)
        return torch.cat(pieces)


class Transposed(TensorSource):
    """``part.transpose(dim0, dim1)``: a flat range is read as the whole outer slabs (``part``'s elements per index
    of the dims before ``dim0``: an expert for ``(1, 2)``) that hold it, transposed, and cut.

    Args:
        part: the tensor as stored.
        dim0, dim1: the dims swapped (negative counts from the end).
        name: how errors name the result.
    """

    def __init__(self, part: TensorSource, dim0: int, dim1: int, name: str = "") -> None:
        ndim = len(part.shape)
        if not (-ndim <= dim0 < ndim and -ndim <= dim1 < ndim) or dim0 % ndim == dim1 % ndim:
            raise ValueError(f"{name}: cannot transpose {part.describe()} {part.shape} along dims {dim0}, {dim1}")
        self.part, self.name = part, name
        self.dims = (min(dim0 % ndim, dim1 % ndim), max(dim0 % ndim, dim1 % ndim))
        shape = list(part.shape)
        shape[self.dims[0]], shape[self.dims[1]] = shape[self.dims[1]], shape[self.dims[0]]
        self.shape = tuple(shape)

    def keys(self) -> list[str]:
        return self.part.keys()

    def describe(self) -> str:
        return f"{self.part.describe()} (transposed)"

    def runs(self) -> list[Run]:
        raise ValueError(f"{self.name}: {self.part.describe()} is stored transposed; its elements are not runs")

    def read_flat(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start <= end <= self.numel:
            raise ValueError(f"{self.name}: range [{start}, {end}) is outside its {self.numel} elements")
        d0, d1 = self.dims
        slab = math.prod(self.shape[d0:])
        first, last = start // slab, -(-end // slab)
        if start == end:
            return self.part.read_flat(0, 0)
        stored = self.part.read_flat(first * slab, last * slab).reshape((last - first,) + self.part.shape[d0:])
        flat = stored.transpose(1, 1 + d1 - d0).reshape(-1)
        return flat[start - first * slab: end - first * slab]


#: The attribute a model's transforms are kept in, from the first call on (the model as built).
_TRANSFORMS = "_lora_dist_weight_transforms"


def model_transforms(model: nn.Module) -> list:
    """The weight transforms transformers applies when it loads ``model`` (empty where it has none).

    The first call, on the model as built, keeps them on the model: FSDP2 and the training engine later change its
    class, and transformers looks some mappings up by class (Qwen2.5-VL's renames).
    """
    kept = model.__dict__.get(_TRANSFORMS)
    if kept is not None:
        return list(kept)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers < 5: checkpoints are read as stored
        return []
    try:
        transforms = list(get_model_conversion_mapping(model))
    except Exception:  # not a PreTrainedModel, or another API: fall back to the model type's entry
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        transforms = list(get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
    model.__dict__[_TRANSFORMS] = transforms
    return list(transforms)


@dataclass
class _Group:
    """The base keys one converter collects for one target, per source pattern, in transformers' order."""

    converter: object
    keys: dict[str, list[str]] = field(default_factory=dict)


def _is_converter(transform) -> bool:
    return hasattr(transform, "operations")


class WeightMap:
    """Which :class:`TensorSource` each model param is read from.

    A name that is a tensor of the dir (or is one with or without the model's
    ``base_model_prefix``) is read as stored, as before any mapping existed,
    unless a converter transforms that tensor into the param of the same name
    (Qwen3-VL-MoE's transposed experts); any other name is looked up among the
    base keys as transformers renames and converts them (all ``WeightRenaming`` s
    in order, then at most one ``WeightConverter``).

    Args:
        base: the model dir.
        transforms: :func:`model_transforms` of the model.
        prefix: the model's ``base_model_prefix``.
        shapes: a param name -> its full shape (None where unknown): what a ``check_dims`` transpose compares with.
    """

    def __init__(self, base: ModelDir, transforms: list, prefix: str = "",
                 shapes: Callable[[str], tuple[int, ...] | None] | None = None) -> None:
        self.base, self.prefix, self._shapes = base, prefix, shapes
        renamings = [t for t in transforms if not _is_converter(t)]
        converters = [t for t in transforms if _is_converter(t)]
        self._renamed: dict[str, str] = {}
        self._groups: dict[str, _Group] = {}
        self._collected: dict[str, str] = {}  # base key -> the converted name that a converter collects it for
        if not transforms:
            return
        for key in sorted(base.keys(), key=_natural_key):
            name = key
            for renaming in renamings:
                name, _ = renaming.rename_source_key(name)
            pattern = None
            for converter in converters:
                name, pattern = converter.rename_source_key(name)
                if pattern is not None:
                    group = self._groups.setdefault(name, _Group(converter))
                    group.keys.setdefault(pattern, []).append(key)
                    self._collected[key] = name
                    break
            if pattern is None and name != key:
                self._renamed.setdefault(name, key)

    def _candidates(self, name: str) -> list[str]:
        p = self.prefix
        names = [name]
        if p and name.startswith(p + "."):
            names.append(name[len(p) + 1:])
        if p:
            names.append(f"{p}.{name}")
        return names

    @classmethod
    def of(cls, base: ModelDir, model: nn.Module) -> WeightMap:
        """Where ``model``'s params are in ``base`` (``model`` as built, unwrapped, or a meta skeleton)."""

        def shape(name: str) -> tuple[int, ...] | None:
            try:
                return full_shape(model.get_parameter(name))
            except AttributeError:
                return None

        return cls(base, model_transforms(model), getattr(model, "base_model_prefix", ""), shape)

    def file_key(self, name: str) -> str | None:
        """The dir's tensor that param ``name`` is stored as, whole: under its own name, or renamed as transformers
        renames it at load (a vision-language checkpoint's ``language_model.model.*`` is Gemma 3's
        ``model.language_model.*`` in memory). None where it has none, or is assembled from several."""
        source = self.source(name)
        return source.key if isinstance(source, FileTensor) else None

    def base_key(self, name: str) -> str | None:
        """The dir's tensor stored under the param's own name (give or take the prefix), if any."""
        return next((c for c in self._candidates(name) if c in self.base), None)

    def source(self, name: str, shape: tuple[int, ...] | None = None) -> TensorSource | None:
        """The source of model param ``name``, or None where the dir has nothing for it.

        Args:
            name: the param's name in the model.
            shape: its full shape; by default the model's (:meth:`of`).

        Raises:
            WeightMappingError: transformers builds it with operations other than ``MergeModulelist``
                and ``Concatenate``, or one ``Transpose`` of the last two dims of one tensor.
        """
        key = self.base_key(name)
        if key is not None:
            target = self._collected.get(key)  # a converter makes this tensor alone into the param of its name
            if target in self._candidates(name) and sum(map(len, self._groups[target].keys.values())) == 1:
                return self._converted(target, self._groups[target], name, shape)
            return FileTensor(self.base, key)
        for candidate in self._candidates(name):
            if candidate in self._groups:
                return self._converted(candidate, self._groups[candidate], name, shape)
            if candidate in self._renamed:
                return FileTensor(self.base, self._renamed[candidate])
        return None

    def _converted(self, name: str, group: _Group, param: str, shape: tuple[int, ...] | None) -> TensorSource:
        converter = group.converter
        ops = list(converter.operations)
        keys = [k for p in converter.source_patterns for k in group.keys.get(p, [])]
        if ([type(op).__name__ for op in ops] == ["Transpose"] and len(keys) == 1
                and getattr(converter, "quantization_operation", None) is None):
            return self._transposed(name, FileTensor(self.base, keys[0]), ops[0], param, shape)
        other = [type(op).__name__ for op in ops if type(op).__name__ not in SUPPORTED_OPS]
        if other or getattr(converter, "quantization_operation", None) is not None:
            shown = ", ".join(repr(op) for op in ops)
            raise WeightMappingError(
                f"{name}: transformers builds this weight from {self.base.path} with [{shown}]; lora_dist reads "
                f"converted weights made with {' and '.join(SUPPORTED_OPS)} only (or one Transpose of the last two "
                f"dims of one tensor), not {', '.join(other) or 'quantizer ops'}"
            )
        # Each source pattern's tensors, in the converter's pattern order (what Concatenate keeps).
        values: list[list[TensorSource] | TensorSource] = [
            [FileTensor(self.base, k) for k in group.keys[p]] for p in converter.source_patterns if p in group.keys
        ]
        try:
            for op in ops:
                dim = int(op.dim)
                if type(op).__name__ == "MergeModulelist":  # stack each pattern's list
                    values = [_stack(v, dim, name) if isinstance(v, list) else v for v in values]
                else:  # Concatenate: everything, in pattern order
                    flat = [s for v in values for s in (v if isinstance(v, list) else [v])]
                    values = [Concat(flat, dim, name)]
        except ValueError as e:
            raise WeightMappingError(f"{self.base.path}: {e}; the checkpoint does not match its config.json") from None
        if len(values) != 1 or isinstance(values[0], list):
            raise WeightMappingError(f"{name}: transformers' conversion [{', '.join(map(repr, ops))}] of "
                                     f"{self.base.path} does not give one tensor; lora_dist cannot read it")
        result = values[0]
        result.name = name
        return result

    def _transposed(self, name: str, stored: FileTensor, op, param: str, shape: tuple[int, ...] | None
                    ) -> TensorSource:
        """``stored`` as transformers' one ``Transpose`` gives it: always, or (``check_dims``) where its shape is
        not the param's."""
        ndim = len(stored.shape)
        dims = {int(op.dim0) % ndim, int(op.dim1) % ndim} if ndim else set()
        if ndim not in (2, 3) or dims != {ndim - 2, ndim - 1}:
            raise WeightMappingError(
                f"{name}: transformers builds this weight from {stored.key} {stored.shape} with [{op!r}]; lora_dist "
                "reads a transpose of the last two dims of a 2-D weight or a 3-D stack of experts only"
            )
        if getattr(op, "check_dims", False):
            shape = shape if shape is not None else self._shapes(param) if self._shapes is not None else None
            if shape is None:
                raise WeightMappingError(f"{name}: transformers transposes {stored.key} only where its shape is not "
                                         "the model's; read it through WeightMap.of(base, model)")
            if tuple(shape) == stored.shape:
                return stored
        return Transposed(stored, ndim - 2, ndim - 1, name)


def _stack(parts: list[TensorSource], dim: int, name: str) -> Concat:
    """``torch.stack(parts, dim)`` as a :class:`Concat` of views with a 1 inserted at ``dim``."""
    shape = parts[0].shape
    ndim = len(shape) + 1
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: cannot stack {shape} tensors along dim {dim}")
    dim %= ndim
    views = []
    for p in parts:
        if p.shape != shape:
            raise ValueError(f"{name}: cannot stack {p.describe()} {p.shape} with {parts[0].describe()} {shape}")
        views.append(View(p, shape[:dim] + (1,) + shape[dim:]))
    return Concat(views, dim, name)
