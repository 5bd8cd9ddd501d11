"""Checking a checkpoint dir: its files against its index, its values, and that it is its base + adapter.

:func:`verify_checkpoint` composes small checks, each returning the problems it
found as one line apiece:

1. :func:`check_config` and :func:`check_files`: ``config.json`` parses; the
   index names only files inside the dir; the headers are valid for their
   files; every tensor is in exactly one file, the one the index names;
   ``total_size`` is right; no stray weight files; at least one tensor; the
   files' lora_dist metadata agree.
2. :func:`check_finite`: every tensor is read, and none holds NaN/Inf.
3. With the base: :func:`check_keys` (the same keys and shapes),
   :func:`check_config_matches` (the base's config but for the dtype),
   :func:`check_dtypes` (each tensor in the dtype the export writes), then
   :func:`check_untouched` on *every* tensor the adapter does not target: each
   is bit-exact with the base. Without the adapter every tensor is compared,
   and a 2-D weight that differs is reported as not checkable (LoRA-merged,
   presumably); any other difference is a problem.
4. With the adapter: :func:`check_targeted` (every targeted tensor is there)
   and :func:`check_merged` on ``sample`` of them, first layer to last (recomputed, within the
   merge's own rounding; all of them with ``sample=None``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from lora_dist.adapter import read_adapter
from lora_dist.dtypes import FLOAT_DTYPES, DTypeError, all_finite, dtype_name, from_safetensors, parse_dtype
from lora_dist.export.errors import ExportError
from lora_dist.inputs import clip
from lora_dist.safetensors_file import HeaderEntry, SafetensorsFormatError, read_header
from lora_dist.export.params import checkpoint_loras
from lora_dist.export.sources import (
    MERGED_FROM_KEY,
    QUANTIZED_DTYPE_KEY,
    QUANTIZED_KEY,
    QUANTIZED_WEIGHTS_KEY,
    merge_flat,
    natural_key,
    output_specs,
    stored_specs,
)
from lora_dist.merge import LoRAWeights, MergeError, lora_delta
from lora_dist.model_dir import SAFE_INDEX, SAFE_SINGLE, ModelDir, ModelDirError
from lora_dist.prequantized import dequantize_fp8, fp8_block_amax, fp8_scale_values, fp8_scales

__all__ = [
    "CheckpointFiles",
    "DequantizedBase",
    "VerifyError",
    "VerifyReport",
    "check_config",
    "check_files",
    "check_finite",
    "check_keys",
    "check_merged",
    "check_targeted",
    "check_untouched",
    "compare_with_base",
    "sample_keys",
    "verify_checkpoint",
]


class VerifyError(ValueError):
    """A checkpoint dir that is inconsistent, corrupt, or not the merge of its base and adapter."""


#: Largest block of a tensor read at once by the value checks.
_READ_BLOCK_BYTES = 64 * 2**20


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` checked.

    Attributes:
        path: the checkpoint dir.
        files: its weight files.
        tensors: how many tensors it holds.
        total_size: bytes of tensor data.
        dtypes: tensors per safetensors dtype.
        compared: the sample (LoRA-targeted tensors first, then others spread evenly), as before
            ``untouched`` existed; kept for callers that count it.
        max_abs_diff: the largest difference from the reference seen in any comparison.
        base: whether a base was given.
        untouched: tensors compared bit-exact with the base (every one the adapter does not target; without
            an adapter, every one found equal).
        targeted: how many tensors the adapter targets (0 without an adapter).
        recomputed: the LoRA-targeted tensors recomputed from base + adapter and compared.
        unchecked: without an adapter, the 2-D weights that differ from the base (LoRA-merged, presumably).
    """

    path: Path
    files: list[str]
    tensors: int
    total_size: int
    dtypes: dict[str, int]
    compared: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    base: bool = False
    untouched: int = 0
    targeted: int = 0
    recomputed: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was checked and found OK, and what was not checked."""
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        line = (f"{self.path}: OK - {self.tensors} tensors ({dtypes}), {self.total_size / 1e6:.1f} MB "
                f"in {len(self.files)} file(s) as the index says, every tensor read, all finite")
        if not self.base:
            return line + "; values not compared with a base (pass --base)"
        if self.targeted:
            line += (f"; all {self.untouched} tensors the adapter does not touch are bit-exact with the base; "
                     f"{len(self.recomputed)} of {self.targeted} LoRA-merged tensors recomputed from base + adapter")
            if len(self.recomputed) < self.targeted:
                line += " (--sample -1 recomputes all)"
            return line + f", max |diff| {self.max_abs_diff:.3g}"
        line += f"; {self.untouched} tensors are bit-exact with the base"
        if self.unchecked:
            shown = ", ".join(self.unchecked[:3]) + (", ..." if len(self.unchecked) > 3 else "")
            line += (f"; {len(self.unchecked)} 2-D weights differ from it ({shown}): LoRA-merged ones, presumably, "
                     "NOT checked without --adapter")
        return line


@dataclass
class CheckpointFiles:
    """A checkpoint dir's weight files as their headers describe them.

    Attributes:
        files: the weight files (the index's, or ``model.safetensors``).
        entries: tensor name -> (file, header entry).
        metadata: the safetensors metadata (of the last file read; the export writes the same into every file).
    """

    files: list[str]
    entries: dict[str, tuple[str, HeaderEntry]]
    metadata: dict[str, str]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in all files."""
        return sum(e.end - e.begin for _, e in self.entries.values())


def _failed(out: Path, problems: list[str]) -> VerifyError:
    return VerifyError(f"{out} failed verification:\n" + "\n".join(f"  - {p}" for p in problems))


def check_config(out: Path) -> list[str]:
    """``config.json`` exists and is valid JSON."""
    try:
        json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"config.json is missing or not valid JSON ({e})"]
    return []


def _inside(name: object) -> bool:
    """Whether an index entry names a file in the checkpoint dir itself (not ``../other/x``, not absolute)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and not os.path.isabs(name))


def check_files(out: Path) -> tuple[CheckpointFiles | None, list[str]]:
    """The index and the weight files agree, and every header is valid for its file.

    Checks that the index names only files inside ``out`` (an entry like
    ``../other/model.safetensors`` is a problem, and that file is not read);
    that every tensor is in exactly one file, the one the index names; that
    the index's ``total_size`` is right; and that no ``*.safetensors`` file is
    left out of the index.

    Returns:
        What the headers describe (None where there are no weight files to read at all), and the problems.
    """
    problems: list[str] = []
    index_path = out / SAFE_INDEX
    weight_map: dict[str, str] = {}
    declared_total = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
            declared_total = (index.get("metadata") or {}).get("total_size")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            problems.append(f"{SAFE_INDEX} is corrupt ({e})")
        outside = sorted({repr(v) for v in weight_map.values() if not _inside(v)})
        if outside:
            problems.append(f"{SAFE_INDEX} names {', '.join(outside[:3])}, not a file in {out}: index entries must "
                            "be file names inside the checkpoint dir")
            weight_map = {k: v for k, v in weight_map.items() if _inside(v)}
        files = sorted(set(weight_map.values()))
    elif (out / SAFE_SINGLE).is_file():
        files = [SAFE_SINGLE]
    else:
        problems.append(f"no {SAFE_INDEX} and no {SAFE_SINGLE}")
        return None, problems
    stray = sorted(p.name for p in out.glob("*.safetensors") if p.name not in files)
    if stray:
        problems.append(f"weight files not in the index: {stray}")
    entries: dict[str, tuple[str, HeaderEntry]] = {}
    metadata: dict[str, str] = {}
    ours: dict[str, dict[str, str]] = {}  # each file's lora_dist metadata, which decides how it is checked
    for name in files:
        path = out / name
        if not path.is_file():
            problems.append(f"{name} is listed in the index but missing")
            continue
        try:
            metadata, header = read_header(path)
        except SafetensorsFormatError as e:
            problems.append(str(e))
            continue
        ours[name] = {k: v for k, v in metadata.items() if k.startswith("lora_dist_")}
        for key, entry in header.items():
            if key in entries:
                problems.append(f"{key!r} is stored twice, in {entries[key][0]} and {name}")
            entries[key] = (name, entry)
    if index_path.is_file() and weight_map:
        for key, name in weight_map.items():
            if key not in entries and (out / name).is_file():
                problems.append(f"{key!r} is in the index (-> {name}) but in no file")
            elif key in entries and entries[key][0] != name:
                problems.append(f"{key!r} is in {entries[key][0]} but the index says {name}")
        for key in sorted(set(entries) - set(weight_map)):
            problems.append(f"{key!r} is in {entries[key][0]} but not in the index")
    first = next(iter(ours), None)
    for name, mine in ours.items():
        differ = sorted(k for k in set(mine) | set(ours[first]) if mine.get(k) != ours[first].get(k))
        if differ:
            problems.append(f"{name} and {first} differ in their metadata {', '.join(differ)}: the files are not "
                            "from one export")
    if not entries and not problems:
        problems.append("the checkpoint holds no tensors")
    found = CheckpointFiles(files, entries, metadata)
    if declared_total is not None and declared_total != found.total_size:
        problems.append(f"index metadata.total_size is {declared_total} but the tensors hold {found.total_size} bytes")
    return found, problems


def _blocks(ckpt: ModelDir, key: str) -> list[slice | None]:
    """Row slices of ``key`` of at most about :data:`_READ_BLOCK_BYTES` each (None: the whole tensor at once)."""
    shape = ckpt.shape(key)
    if len(shape) == 0 or shape[0] == 0:
        return [None]
    row_bytes = max(1, ckpt.nbytes(key) // shape[0])
    step = max(1, _READ_BLOCK_BYTES // row_bytes)
    return [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def check_finite(ckpt: ModelDir, keys: list[str]) -> list[str]:
    """Every tensor among ``keys`` is read (in row blocks), and no floating one holds NaN/Inf."""
    problems = []
    for key in keys:
        for rows in _blocks(ckpt, key):
            tensor = ckpt.read(key, rows)
            if tensor.dtype in FLOAT_DTYPES and not all_finite(tensor):
                problems.append(f"{key!r} holds NaN/Inf")
                break
    return problems


def check_keys(base: ModelDir, found: CheckpointFiles, stored: bool = False) -> list[str]:
    """The checkpoint holds exactly the base's tensors, in the base's shapes (``stored``: the tensors the base files
    store, for an FP8 base written as stored)."""
    problems = []
    entries = found.entries
    if stored:
        base = _Stored(base)
    missing, extra = sorted(set(base.keys()) - set(entries)), sorted(set(entries) - set(base.keys()))
    if missing:
        problems.append(f"{len(missing)} base tensors are missing: {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} tensors are not in the base: {extra[:5]}")
    for key in sorted(set(base.keys()) & set(entries)):
        if tuple(entries[key][1].shape) != base.shape(key):
            problems.append(f"{key!r} has shape {entries[key][1].shape}, the base {base.shape(key)}")
    return problems


def check_targeted(found: CheckpointFiles, targeted: Mapping[str, LoRAWeights]) -> list[str]:
    """Every tensor the adapter targets is in the checkpoint."""
    absent = sorted(set(targeted) - set(found.entries))
    return [f"LoRA-targeted tensors are missing: {absent[:5]}"] if absent else []


#: ``config.json`` keys an export may change: the dtype it was written in, the writer's transformers version.
_CONFIG_FREE = frozenset({"dtype", "torch_dtype", "transformers_version", "_name_or_path", "quantization_config"})


def _config_fields(d: ModelDir) -> dict:
    """``d``'s config as transformers reads it (defaults written out or left implicit agree), or as written where
    transformers cannot read it; without the keys an export may change."""
    try:
        fields = d.hf_config.to_dict()
    except ModelDirError:
        fields = d.config()
    return {k: v for k, v in fields.items() if k not in _CONFIG_FREE}


def check_config_matches(ckpt: ModelDir, base: ModelDir, stored: bool) -> list[str]:
    """The checkpoint's ``config.json`` is its base's but for the dtype (and the transformers version); its
    ``quantization_config`` is the base's where the export keeps an FP8 base as stored (``stored``), else absent.
    A changed ``tie_word_embeddings`` or ``rope_scaling`` would load or run the merged weights otherwise."""
    got, want = _config_fields(ckpt), _config_fields(base)
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    problems = [f"config.json differs from the base's in {', '.join(differ[:8])} (e.g. {differ[0]}: "
                f"{clip(repr(got.get(differ[0])), 80)} against the base's {clip(repr(want.get(differ[0])), 80)})"] \
        if differ else []
    if ckpt.config().get("quantization_config") != (base.config().get("quantization_config") if stored else None):
        problems.append("config.json's quantization_config is not the base's" if stored else
                        "config.json has a quantization_config, but every weight is written dense")
    return problems


def check_dtypes(found: CheckpointFiles, base: ModelDir, config: Mapping, stored: bool) -> list[str]:
    """Each tensor is in the dtype the export writes it in: every floating tensor in ``config.json``'s dtype
    (``export.dtype``, ``--dtype``) but those the model keeps in fp32, or every one in its base's (``lora-dist
    merge`` without ``--dtype``); FP8 codes and scales, and non-floating tensors, as the base stores them
    (:func:`output_specs`, :func:`stored_specs`: the writer's own rule)."""
    specs = stored_specs if stored else output_specs
    declared = config.get("dtype") or config.get("torch_dtype")
    try:
        dtype = parse_dtype(declared) if isinstance(declared, str) else None
    except DTypeError:
        dtype = None
    got = {key: from_safetensors(entry.dtype) for key, (_, entry) in found.entries.items()}
    wrong: list[str] = []
    for out_dtype in [None] if dtype is None else [None, dtype]:  # the base's dtypes, or the declared one
        want = specs(base, out_dtype)
        wrong = [k for k in sorted(got, key=natural_key) if k in want and got[k] != want[k].dtype]
        if not wrong:
            return []
    key = wrong[0]
    return [f"{len(wrong)} tensors are not in the dtype the export writes them in, e.g. {key!r}: "
            f"{dtype_name(got[key])}, not {dtype_name(want[key].dtype)}" +
            (f" (config.json declares {declared})" if declared else "")]


class _Stored:
    """A model dir's tensors as its files store them (an FP8 weight's codes and scales): the ``keys``, ``shape``,
    ``nbytes`` and ``read`` the checks use."""

    def __init__(self, base: ModelDir) -> None:
        self.base = base

    def keys(self) -> list[str]:
        return self.base.stored_keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.stored_shape(key)

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * from_safetensors(self.base.stored_dtype(key)).itemsize

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        tensor = self.base.stored_read(key, rows)
        return tensor.view(torch.uint8) if str(tensor.dtype).startswith("torch.float8") else tensor  # bit for bit


def check_merged_fp8(ckpt: ModelDir, base: ModelDir, targeted: Mapping[str, LoRAWeights],
                     keys: list[str]) -> tuple[list[str], float]:
    """LoRA-targeted weights of an FP8 base written as stored equal ``base + adapter`` recomputed with the export's
    merge and quantized again (:func:`lora_dist.prequantized.quantize_fp8`): each block's scale is the one of a
    largest magnitude within the merge's own rounding of the recomputed one (powers of two where the base's are),
    no value needs more than the format's range under it, and each code is the nearest FP8 value, under the
    checkpoint's own scale, to a value within that rounding of the recomputed merge. A missing or wrong adapter
    moves codes by more.

    Returns:
        The problems, and the largest absolute difference seen (dequantized).
    """
    problems, largest = [], 0.0
    for key in keys:
        blocks, w0, lora = ckpt.fp8_blocks(key), base.read(key), targeted[key]
        try:
            ref = merge_flat(w0.reshape(-1), 0, w0.numel(), tuple(w0.shape), lora, torch.float32, key).view(w0.shape)
        except (ExportError, MergeError) as e:
            problems.append(f"{key!r} cannot be recomputed: {e}")
            continue
        codes, scale = ckpt.stored_read(key).float(), ckpt.stored_read(blocks.scale_key).reshape(blocks.grid)
        bound = _fp32_merge_bound(ref, lora).float()
        got_scale = fp8_scale_values(scale)
        edges = [fp8_scale_values(fp8_scales(fp8_block_amax(m, blocks), blocks))
                 for m in ((ref.abs() - bound).clamp(min=0), ref.abs() + bound)]
        ok_scale = bool(((got_scale >= torch.minimum(*edges)) & (got_scale <= torch.maximum(*edges))).all())
        per_element = dequantize_fp8(torch.ones(ref.shape), got_scale, blocks.block)
        top = torch.finfo(blocks.codes).max
        # a scale rounded to bf16 may leave the largest value a rounding above the range: never more
        ok_range = bool((((ref.abs() - bound) / per_element) <= top * (1 + 2.0 ** -7)).all())
        lo, hi = (((ref + d) / per_element).clamp(-top, top).to(blocks.codes).float() for d in (-bound, bound))
        ok_codes = bool(((codes >= lo) & (codes <= hi)).all())
        diff = _max_abs((codes * per_element - ref).abs())
        largest = max(largest, diff)
        if not (ok_scale and ok_range and ok_codes):
            what = "its block scales" if not (ok_scale and ok_range) else "its codes"
            problems.append(f"{key!r}: {what} differ from base + adapter quantized again (max |diff| {diff:.3g})")
    return problems, largest


class DequantizedBase:
    """The base as an NF4 run's export saw it (``model.quantize=nf4``, the checkpoint's metadata): the weights
    named in :data:`~lora_dist.export.sources.QUANTIZED_WEIGHTS_KEY` read as the NF4 of the whole weight
    (:func:`lora_dist.nf4.quantize_whole`), dequantized (what each rank's shard is, bit for bit), one weight cached at a time; every other tensor as
    stored. Only ``read`` differs from the :class:`ModelDir` it wraps."""

    def __init__(self, base: ModelDir, metadata: Mapping[str, str]) -> None:
        self.base = base
        self.quantized = set(filter(None, metadata.get(QUANTIZED_WEIGHTS_KEY, "").split(",")))
        self.dtype = _stored_dtype(metadata.get(QUANTIZED_DTYPE_KEY, "bfloat16"))
        self._cached: tuple[str, torch.Tensor] | None = None

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        if key not in self.quantized:
            return self.base.read(key, rows)
        if self._cached is None or self._cached[0] != key:
            from lora_dist.nf4 import dequantize, quantize_whole

            self._cached = (key, dequantize(quantize_whole(self.base.read(key).to(self.dtype))))
        whole = self._cached[1]
        return whole if rows is None else whole[rows]


def _reference(base: ModelDir, metadata: Mapping[str, str]) -> "ModelDir | DequantizedBase":
    """What the checkpoint's tensors are compared with: the base, or its dequantized NF4 form for an NF4 export."""
    return DequantizedBase(base, metadata) if metadata.get(QUANTIZED_KEY) else base


def _max_abs(error: torch.Tensor) -> float:
    return error.max().item() if error.numel() else 0.0


def compare_with_base(ckpt: ModelDir, base: ModelDir, keys: list[str]) -> tuple[dict[str, float], float]:
    """Compare tensors with the base's, bit-exact in the checkpoint's dtype, reading both in row blocks.

    Returns:
        The tensors that differ, each with its largest absolute difference; and the largest difference seen.
    """
    differ: dict[str, float] = {}
    for key in keys:
        for rows in _blocks(ckpt, key):
            got = ckpt.read(key, rows)
            ref = base.read(key, rows).to(got.dtype)
            if not torch.equal(got, ref):
                diff = _max_abs((got.double() - ref.double()).abs())
                differ[key] = max(differ.get(key, 0.0), diff if diff == diff else float("inf"))
    return differ, max(differ.values(), default=0.0)


def check_untouched(ckpt: ModelDir, base: ModelDir, keys: list[str]) -> tuple[list[str], float]:
    """Tensors the merge does not touch are the base's, bit-exact in the checkpoint's dtype (copied, not computed).

    Returns:
        The problems, and the largest absolute difference seen.
    """
    differ, largest = compare_with_base(ckpt, base, keys)
    return [f"{key!r} differs from the base (max |diff| {diff:.3g}); the merge does not touch it, so the "
            "checkpoint is not its base + adapter" for key, diff in differ.items()], largest


def _mergeable(ckpt: ModelDir, key: str) -> bool:
    """Whether a LoRA merge could have changed ``key``: a 2-D ``.weight``."""
    return key.endswith(".weight") and len(ckpt.shape(key)) == 2


def _stored_dtype(name: str) -> torch.dtype:
    try:
        return parse_dtype(name) or torch.float32
    except DTypeError:
        return torch.float32


def _tolerance(out_dtype: torch.dtype, merged_from: str) -> tuple[float, float] | None:
    """``(rtol, atol)`` for comparing a recomputed merge, or None for exact."""
    dtypes = {out_dtype} | {_stored_dtype(n) for n in merged_from.split(",") if n}
    if torch.bfloat16 in dtypes:
        return 1.6e-2, 1e-5
    if torch.float16 in dtypes:
        return 1e-3, 1e-5
    return None


def _fp32_merge_bound(ref: torch.Tensor, lora: LoRAWeights) -> torch.Tensor:
    """How far two correct fp32 merges of one tensor can differ, element by element.

    ``W0 + scale * B @ A`` rounds once in the add and once in the scale; the r-term sums of
    ``B @ A`` may run in another order on another device (a GPU's matmul), each within ``r``
    roundings of ``|B| @ |A|``. Twice these (one per merge) bounds the difference, so a merge
    done on a GPU verifies on a CPU while a wrong scale, adapter or base does not.
    """
    eps = torch.finfo(torch.float32).eps
    magnitude = lora_delta(lora.lora_A.abs(), lora.lora_B.abs(), abs(lora.scale), lora.fan_in_fan_out,
                           num_experts=lora.num_experts).double()
    return 2 * eps * ref.double().abs() + 2 * (lora.r + 1) * eps * magnitude.view(ref.shape)


def check_merged(ckpt: ModelDir, base: ModelDir, targeted: Mapping[str, LoRAWeights], keys: list[str],
                 merged_from: str) -> tuple[list[str], float]:
    """LoRA-targeted tensors equal ``base + adapter`` recomputed with the export's own merge.

    fp32 tensors may differ by the merge's own rounding (:func:`_fp32_merge_bound`); bf16/fp16
    within their rounding, which also applies when the merged base weights were held in
    bf16/fp16 (``merged_from``, the checkpoint's ``lora_dist_merged_base_dtype`` metadata).

    Returns:
        The problems, and the largest absolute difference seen.
    """
    problems, largest = [], 0.0
    for key in keys:
        got, w0 = ckpt.read(key), base.read(key)
        lora = targeted[key]
        try:
            ref = merge_flat(w0.reshape(-1), 0, w0.numel(), tuple(w0.shape), lora, got.dtype, key).view(got.shape)
        except (ExportError, MergeError) as e:  # base + adapter itself is not finite in the checkpoint's dtype
            problems.append(f"{key!r} cannot be recomputed: {e}")
            continue
        tol = _tolerance(got.dtype, merged_from)
        error = (got.double() - ref.double()).abs()
        diff = _max_abs(error)
        largest = max(largest, diff)
        if tol is None:
            ok = bool((error <= _fp32_merge_bound(ref, lora)).all())
        else:
            # Rounding the result, or the base weight before the merge, errs relative to either size.
            rtol, atol = tol
            ok = bool((error <= atol + rtol * torch.maximum(ref.double().abs(), w0.double().abs())).all())
        if not ok:
            problems.append(f"{key!r} differs from base + adapter (max |diff| {diff:.3g})")
    return problems, largest


def _spread(keys: list[str], n: int) -> list[str]:
    """``n`` of ``keys`` spread evenly from the first to the last (all of them where ``n`` is not fewer)."""
    if n >= len(keys):
        return list(keys)
    if n <= 1:
        return keys[:n]
    return [keys[round(i * (len(keys) - 1) / (n - 1))] for i in range(n)]


def sample_keys(keys: list[str], targeted: set[str], sample: int | None) -> list[str]:
    """LoRA-targeted keys (``sample`` of them, spread from the first layer to the last), then others spread
    over the rest to make up ``sample``.

    Args:
        keys: every key, in natural order.
        targeted: the LoRA-targeted keys.
        sample: how many to pick; None for all.
    """
    lora_keys = [k for k in keys if k in targeted]
    others = [k for k in keys if k not in targeted]
    if sample is None:
        return lora_keys + others
    chosen = _spread(lora_keys, sample)
    return chosen + _spread(others, sample - len(chosen))


def verify_checkpoint(
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    sample: int | None = 8,
) -> VerifyReport:
    """Check a HF safetensors checkpoint dir, and optionally that it is ``base + adapter``.

    Always: ``config.json`` parses; the index names only files inside the dir,
    and it and the files agree (every tensor in exactly one file, where the
    index says, ``total_size`` right, no stray weight files); every header is
    valid for its file size; every tensor is read and none holds NaN/Inf.

    With ``base_dir``: the same keys and shapes as the base, its config but for
    the dtype, each tensor in the dtype the export writes it in, and every tensor
    the merge does not touch is bit-exact with the base - every one, not a
    sample. Without ``adapter_dir`` it cannot know which tensors the merge
    touched: a 2-D weight that differs from the base is reported as not
    checked (:attr:`VerifyReport.unchecked`), any other difference is a problem.

    With ``adapter_dir`` too: every targeted tensor is present, and ``sample``
    of them (None: all; spread from the first layer to the last) are recomputed with the export's merge and compared:
    fp32 within the merge's own rounding (a GPU may sum ``B @ A`` in another
    order); bf16/fp16 within their rounding, which also applies when the export
    merged base weights held in bf16/fp16 (it records their dtype in the
    safetensors metadata key ``lora_dist_merged_base_dtype``).

    Args:
        out_dir: the checkpoint dir.
        base_dir: the base checkpoint it was made from.
        adapter_dir: the adapter it was merged with (needs ``base_dir``).
        sample: how many LoRA-targeted tensors to recompute; None for all.

    Returns:
        What was checked.

    Raises:
        VerifyError: listing every problem found.
        ValueError: ``adapter_dir`` without ``base_dir``.
    """
    out = Path(out_dir)
    if adapter_dir is not None and base_dir is None:
        raise ValueError("verifying against an adapter needs the base checkpoint too (base_dir)")
    if not out.is_dir():
        raise _failed(out, ["not a directory"])
    problems = check_config(out)
    found, file_problems = check_files(out)
    problems += file_problems
    if problems or found is None:
        raise _failed(out, problems)

    try:
        ckpt = ModelDir(out)
    except ModelDirError as e:  # the files passed the checks above, so this is the config or a header
        raise _failed(out, [str(e)]) from None
    keys = sorted(found.entries, key=natural_key)
    problems += check_finite(ckpt, keys)
    dtypes: dict[str, int] = {}
    for key in keys:
        dtypes[found.entries[key][1].dtype] = dtypes.get(found.entries[key][1].dtype, 0) + 1
    report = VerifyReport(out, found.files, len(found.entries), found.total_size, dtypes, base=base_dir is not None)

    if base_dir is not None:
        base = ModelDir(base_dir, "--base")
        stored = any(ckpt.fp8_blocks(k) is not None for k in ckpt.keys())  # an FP8 base written as stored
        problems += check_keys(base, found, stored)
        problems += check_config_matches(ckpt, base, stored) + check_dtypes(found, base, ckpt.config(), stored)
        targeted = checkpoint_loras(base, read_adapter(adapter_dir)) if adapter_dir is not None else {}
        problems += check_targeted(found, targeted)
        reference = _reference(base, found.metadata)  # an NF4 run's export: its dequantized base
        if not problems and adapter_dir is not None:
            fp8 = {k: ckpt.fp8_blocks(k) for k in targeted if ckpt.fp8_blocks(k) is not None}
            merged_away = set(targeted) | {b.scale_key for b in fp8.values()}
            untouched = [k for k in keys if k not in merged_away]
            # an FP8 export's untouched tensors are its base's bytes: codes, scales and all
            untouched_problems, untouched_diff = check_untouched(_Stored(ckpt) if stored else ckpt,
                                                                 _Stored(base) if stored else reference, untouched)
            chosen = sample_keys(keys, set(targeted), sample)
            merged_keys = [k for k in keys if k in targeted]
            recompute = merged_keys if sample is None else [k for k in chosen if k in targeted]
            dense = [k for k in recompute if k not in fp8]
            merged_problems, merged_diff = check_merged(ckpt, reference, targeted, dense,
                                                        found.metadata.get(MERGED_FROM_KEY, ""))
            fp8_problems, fp8_diff = check_merged_fp8(ckpt, base, targeted, [k for k in recompute if k in fp8])
            merged_problems += fp8_problems
            merged_diff = max(merged_diff, fp8_diff)
            problems += merged_problems + untouched_problems
            report.compared = chosen  # targeted keys first: the sample, as it was always reported
            report.untouched, report.targeted, report.recomputed = len(untouched), len(merged_keys), recompute
            report.max_abs_diff = max(0.0, merged_diff, untouched_diff)
        elif not problems:
            differ, largest = compare_with_base(ckpt, reference, keys)
            scales = {b.scale_key for b in (ckpt.fp8_blocks(k) for k in ckpt.keys()) if b is not None}
            report.unchecked = [k for k in keys if k in differ and (_mergeable(ckpt, k) or k in scales)]
            problems += [f"{k!r} differs from the base (max |diff| {d:.3g}); a LoRA merge changes only 2-D weights"
                         for k, d in differ.items() if k not in report.unchecked]
            report.untouched = len(keys) - len(differ)
            report.max_abs_diff = largest
    if problems:
        raise _failed(out, problems)
    return report
