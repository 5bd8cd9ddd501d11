"""Reading local Hugging Face model dirs (a base model, or a merged export) without loading them whole.

A model dir is ``config.json`` plus ``model.safetensors`` or sharded
``model-0000i-of-0000N.safetensors`` files with ``model.safetensors.index.json``;
where both are there, ``model.safetensors`` is read, as transformers reads it.
:class:`ModelDir` reads one tensor, some of its rows, or a flat element
range at a time, straight from the memory-mapped files, so a rank only ever
touches the bytes it owns.

Opening a dir checks what it can cheaply: ``config.json`` is a JSON object with a
``model_type``, the index names only files inside the dir, and every weight file has a
readable header. A checkpoint published quantized (block-scaled FP8, gpt-oss's MXFP4) is shown as the
dense weights it stands for (:mod:`lora_dist.prequantized`); other quantized checkpoints are refused.
lora_dist never runs code shipped in a model dir (``trust_remote_code``):
a model whose architecture transformers does not have is refused when its config is
needed (:attr:`ModelDir.hf_config`); merging tensors by name needs no code.

:func:`skeleton` builds the model a dir describes on the meta device (its names and shapes, no memory),
through the ``transformers`` class :func:`model_class` picks.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

import torch
from safetensors import safe_open

from lora_dist.dtypes import from_safetensors
from lora_dist.errors import UserError
from lora_dist.inputs import clip, excerpt, read_json
from lora_dist.prequantized import PrequantizedError, dense_view

__all__ = ["REMOTE_CODE_FIX", "SAFE_INDEX", "SAFE_SINGLE", "ModelDir", "ModelDirError", "alibi_attention",
           "kept_in_fp32", "model_class",
           "read_config_json", "recurrent_layers", "skeleton", "text_config"]

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


#: Said whenever a model or tokenizer needs code shipped in its dir.
REMOTE_CODE_FIX = "lora_dist never runs code from a model dir (trust_remote_code)"


class ModelDirError(UserError, ValueError):
    """A model dir that is missing, incomplete or corrupt."""


def read_config_json(path: str | Path, option: str = "model.path") -> dict:
    """A model dir's ``config.json``: a JSON object with a ``model_type``; ``option`` is what names the dir (an error
    says to point it at a checkpoint).

    Raises:
        ModelDirError: missing, unreadable, not UTF-8, not JSON, not an object, or no ``model_type``.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ModelDirError(f"{path} has no config.json; {option} must be a Hugging Face checkpoint dir")
    config = read_json(file, ModelDirError, "the model config")
    if not isinstance(config, dict):
        raise ModelDirError(f"{file} must hold a JSON object (a transformers config), got {excerpt(config, 80)}; "
                            "restore it from the original checkpoint")
    model_type = config.get("model_type")
    if not (isinstance(model_type, str) and model_type):
        raise ModelDirError(f"{file} has no model_type (got {excerpt(model_type, 80)}), so the architecture is "
                            "unknown; restore config.json from the original checkpoint")
    return config


def _check_weight_map(index: Path, weight_map: object) -> dict[str, str]:
    """The index's ``weight_map``: tensor names -> weight files that lie inside the dir."""
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelDirError(f"{index}: weight_map must map tensor names to file names, got "
                            f"{excerpt(weight_map, 80)}; re-save the checkpoint")
    for file in sorted(set(weight_map.values())):
        name = PurePosixPath(file)
        if not file or name.is_absolute() or ".." in name.parts:
            raise ModelDirError(f"{index} names {excerpt(file)}, which is outside the model dir; an index may only "
                                "name weight files in its own dir: restore the index from the original checkpoint")
    return dict(weight_map)


def hash_weight_file(h, path: Path, offsets: Iterable[int], sample_bytes: int) -> None:
    """Add a safetensors file's name, size, header and ``sample_bytes`` at each of ``offsets`` to the hash ``h``:
    cheap for any size, and two files with the same shapes but other weights still differ."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
        h.update(fh.read(min(header, 100_000_000)))
        for offset in offsets:
            fh.seek(offset)
            h.update(fh.read(sample_bytes))


class ModelDir:
    """Lazy, tensor-at-a-time access to a local HF safetensors model dir.

    Open it once and hand it on: the loader, the export and the checks all read through it.

    Args:
        path: the model dir.
        option: what names it, for errors (``model.path``; the CLI's ``--base``).

    Raises:
        ModelDirError: no config.json, or one that is not a JSON object with a
            ``model_type``; no safetensors weights (pickled ``pytorch_model.bin``
            is refused); an index that is corrupt, names missing files or files
            outside the dir; or an unreadable safetensors header.
    """

    def __init__(self, path: str | Path, option: str = "model.path") -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelDirError(f"model path {str(self.path)!r} is not a directory; set {option} to a local HF "
                                "checkpoint dir")
        self._config = read_config_json(self.path, option)
        index = self.path / SAFE_INDEX
        # transformers reads model.safetensors where there is one, whatever index lies beside it (save_pretrained
        # of a small model into the dir of a sharded save leaves the old index behind)
        if (self.path / SAFE_SINGLE).is_file():
            weight_map = None
        elif index.is_file():
            loaded = read_json(index, ModelDirError, "the weight index")
            if not isinstance(loaded, dict) or "weight_map" not in loaded:
                raise ModelDirError(f"{index} is corrupt (no weight_map); re-save the checkpoint")
            weight_map = _check_weight_map(index, loaded["weight_map"])
        else:
            pickled = list(self.path.glob("pytorch_model*.bin"))
            hint = " (only pickled .bin weights found: lora_dist never unpickles; convert them to safetensors)" if pickled else ""
            raise ModelDirError(f"{self.path} has no safetensors weights{hint}")
        self._handles: dict[str, object] = {}
        self._indexed = weight_map is not None
        if weight_map is None:
            handle = self._open(SAFE_SINGLE)
            weight_map = {k: SAFE_SINGLE for k in handle.keys()}  # type: ignore[attr-defined]
            if index.is_file():
                self._warn_ignored_index(index, weight_map)
        self.weight_map: dict[str, str] = dict(weight_map)
        listed: dict[str, list[str]] = {}
        for key, file in self.weight_map.items():
            listed.setdefault(file, []).append(key)
        for file, keys in sorted(listed.items()):
            held = set(self._open(file).keys())  # type: ignore[attr-defined]
            absent = [k for k in keys if k not in held]
            if absent:  # a stale index (the weights re-saved in other shards): read, it would fail mid-load
                more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
                raise ModelDirError(f"{self.path / SAFE_INDEX} lists {absent[0]}{more} in {file}, which does not hold "
                                    "it; the index does not match the weight files: restore the checkpoint's own "
                                    "index or re-save the checkpoint")
        try:  # a checkpoint published quantized (FP8, MXFP4) is read as the dense weights it stands for
            self._dense = dense_view(self._config, self, self.path)
        except PrequantizedError as e:
            raise ModelDirError(str(e)) from None
        self._keys = [k for k in self.weight_map if k not in self._dense.hidden]
        self._keys += [k for k in self._dense.tensors if k not in self.weight_map]

    def _warn_ignored_index(self, index: Path, weight_map: dict[str, str]) -> None:
        """Say so where an index beside ``model.safetensors`` describes other weights: it is ignored, as transformers
        ignores it, and a user may have meant the sharded weights it names."""
        try:
            listed = read_json(index, ModelDirError, "the weight index")
        except ModelDirError:
            listed = None
        if not isinstance(listed, dict) or listed.get("weight_map") != weight_map:
            log.warning("%s: %s does not describe %s (left by an earlier sharded save?); reading %s, as "
                        "transformers does: delete the stale index", self.path, SAFE_INDEX, SAFE_SINGLE, SAFE_SINGLE)

    def _open(self, file: str):
        if file not in self._handles:
            full = self.path / file
            if not full.is_file():
                raise ModelDirError(f"{full} is listed in the index but missing; the checkpoint is incomplete")
            try:
                self._handles[file] = safe_open(str(full), framework="pt")
            except Exception as e:  # safetensors' own error types
                raise ModelDirError(f"{full} is not a readable safetensors file ({e}); re-download or re-save it") from None
        return self._handles[file]

    def fingerprint(self, samples: int = 4, sample_bytes: int = 4096) -> str:
        """A hash of what the loader reads: config, index, tokenizer config, and each weight file's name, size,
        header and ``samples`` evenly spaced pieces of its tensor bytes (a few MB for a 400B model)."""
        h = hashlib.sha256()
        read = ("config.json", SAFE_INDEX, "tokenizer_config.json") if self._indexed else ("config.json",
                                                                                         "tokenizer_config.json")
        for name in read:
            f = self.path / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes())
        for name in sorted(set(self.weight_map.values())):
            f = self.path / name
            size = f.stat().st_size
            hash_weight_file(h, f, (size * (i + 1) // (samples + 1) for i in range(samples)), sample_bytes)
        return h.hexdigest()

    def config(self) -> dict:
        """``config.json`` as a dict (checked when the dir was opened)."""
        return copy.deepcopy(self._config)

    @functools.cached_property
    def hf_config(self):
        """The ``transformers`` config (``AutoConfig``) of the model, read once; never runs code from the dir.

        Raises:
            ModelDirError: the architecture needs code shipped in the dir (``auto_map``), or
                transformers cannot read the config (e.g. an unknown ``model_type``).
        """
        from transformers import AutoConfig

        remote = "auto_map" in self._config
        try:
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        except Exception as e:  # transformers' own errors: ValueError, KeyError, OSError...
            if remote:
                raise ModelDirError(
                    f"{self.path}: model_type {excerpt(self._config['model_type'], 80)} needs code shipped in the "
                    f"model dir (auto_map in config.json); {REMOTE_CODE_FIX}; use a version of the model in an "
                    "architecture transformers has, or convert it: load it yourself with trust_remote_code=True "
                    "after reviewing the code and save it as a native architecture"
                ) from None
            reason = clip(" ".join(str(e).split()), 300)
            raise ModelDirError(f"{self.path}/config.json: transformers cannot read it ({reason}); "
                                "restore it or upgrade transformers") from None
        if remote:
            log.warning("%s: config.json names custom code (auto_map); lora_dist never runs it and uses "
                        "transformers' own %r implementation", self.path, self._config["model_type"])
        if getattr(config, "quantization_config", None) is not None:  # the model is built and read dense
            del config.quantization_config
        return config

    @functools.cached_property
    def _fp32_modules(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The model's ``_keep_in_fp32_modules`` and ``_keep_in_fp32_modules_strict`` (a composite model's gathered
        from its parts, as transformers gathers them); none where transformers has no class for the checkpoint."""
        try:
            model = skeleton(self)
        except ModelDirError:  # merged by tensor names alone
            return (), ()
        return tuple(sorted(model._keep_in_fp32_modules or ())), tuple(sorted(model._keep_in_fp32_modules_strict or ()))

    def kept_in_fp32(self, dtype: torch.dtype | None):
        """:func:`kept_in_fp32` of the checkpoint's model class, for its tensor names. The class is built (a
        skeleton: seconds and ~100 MB on a CPU) only where ``dtype`` is one that keeps tensors in fp32."""
        if dtype not in (torch.bfloat16, torch.float16):
            return kept_in_fp32((), (), dtype)
        return kept_in_fp32(*self._fp32_modules, dtype)

    @property
    def quantized(self) -> bool:
        """Whether the files hold weights quantized (:mod:`lora_dist.prequantized`), shown here dequantized."""
        return bool(self._dense.tensors)

    def fp8_blocks(self, key: str):
        """How the files store dense tensor ``key`` as block-scaled FP8 (a
        :class:`~lora_dist.prequantized.FP8Blocks`), or None where they store it otherwise."""
        dense = self._dense.tensors.get(key)
        return dense.fp8 if dense is not None else None

    def keys(self) -> list[str]:
        """The checkpoint's tensors; a quantized weight's dense tensor in place of its stored parts."""
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._dense.tensors or (key in self.weight_map and key not in self._dense.hidden)

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shape(self, key: str) -> tuple[int, ...]:
        dense = self._dense.tensors.get(key)
        return dense.shape if dense is not None else self.stored_shape(key)

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype name (a dequantized weight's: the checkpoint's declared dtype)."""
        dense = self._dense.tensors.get(key)
        return dense.safetensors_dtype if dense is not None else self.stored_dtype(key)

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * from_safetensors(self.dtype(key)).itemsize

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor, or rows ``rows`` of its first dimension, reading only those bytes (a quantized weight's
        rows dequantized)."""
        dense = self._dense.tensors.get(key)
        if dense is None:
            return self.stored_read(key, rows)
        try:
            return dense.read(self, rows)
        except ModelDirError:
            raise
        except Exception as e:
            raise ModelDirError(f"cannot dequantize {key!r} from {', '.join(dense.parts)} ({e}); the file is "
                                "corrupt") from None

    # The tensors as stored in the files (what :mod:`lora_dist.prequantized` reads a quantized weight from).

    def stored_keys(self) -> list[str]:
        return list(self.weight_map)

    def _slice(self, key: str):
        if key not in self.weight_map:
            raise ModelDirError(f"tensor {key!r} is not in {self.path}")
        return self._handles[self.weight_map[key]].get_slice(key)  # type: ignore[attr-defined]

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def stored_dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def stored_read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        sl = self._slice(key)
        try:
            if rows is None:
                return self._handles[self.weight_map[key]].get_tensor(key)  # type: ignore[attr-defined]
            return sl[rows]
        except Exception as e:
            raise ModelDirError(f"cannot read {key!r} from {self.weight_map[key]} ({e}); the file is corrupt") from None

    def read_flat(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the row-major flattened tensor (ZeRO-3 partitions)."""
        shape = self.shape(key)
        if len(shape) == 0:
            return self.read(key).reshape(1)[start:end]
        row = math.prod(shape[1:]) or 1
        first, last = start // row, -(-end // row)
        block = self.read(key, slice(first, last)).reshape(-1)
        return block[start - first * row : end - first * row]


#: What a config names its layers' kinds with, and the kinds that carry a state along the sequence.
_LAYER_KINDS = ("layer_types", "layers_block_type", "block_types")
_RECURRENT_KINDS = ("linear_attention", "mamba", "conv", "recurrent", "hybrid")
#: Config keys only models with recurrent layers have, and what those layers are.
_RECURRENT_KEYS = {"mamba_": "Mamba", "ssm_": "Mamba", "time_step_rank": "Mamba", "conv_L_cache": "short convolution",
                   "linear_conv_kernel_dim": "linear attention", "linear_attn_config": "linear attention"}
_RECURRENT_TYPES = ("rwkv", "xlstm", "mamba", "mamba2", "falcon_mamba", "recurrent_gemma")


def recurrent_layers(config: dict) -> str | None:
    """What in ``config.json`` (a dict; a vision-language one's ``text_config`` too) shows layers that carry a state
    from token to token (Mamba, short convolutions, linear attention: Qwen3-Next, Granite 4, Nemotron-H, Jamba,
    LFM2, MiniMax...), None for a model of attention layers only. Attention masks cannot keep such a state inside
    a packed document."""
    for c in (config, config.get("text_config")):
        if not isinstance(c, dict):
            continue
        if c.get("model_type") in _RECURRENT_TYPES:
            return f"model type {c['model_type']!r}"
        for name in _LAYER_KINDS:
            kinds = c.get(name)
            found = sorted({k for k in kinds if isinstance(k, str) and k in _RECURRENT_KINDS}) if isinstance(
                kinds, list) else []
            if found:
                return f"{', '.join(found)} layers in {name}"
        for key in c:
            kind = next((v for k, v in _RECURRENT_KEYS.items() if key.startswith(k)), None)
            if kind is not None:
                return f"{kind} layers: config.json has {key}"
    return None


def alibi_attention(config) -> bool:
    """Whether the model biases attention with ALiBi (Bloom, Falcon with ``alibi``, MPT), whose biases transformers
    builds from a 2-D padding mask: it takes no block mask of packed documents. ``config``: ``config.json`` as a
    dict, or the transformers config."""
    def get(c, key):
        return c.get(key) if isinstance(c, dict) else getattr(c, key, None)

    return get(config, "model_type") in ("bloom", "mpt") or get(config, "alibi") is True


def text_config(hf_config):
    """The language model's config: a vision-language config's ``text_config``, else the config itself."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def model_class(hf_config):
    """The ``transformers`` Auto class that builds this architecture: the checkpoint's own class, so that every
    tensor of it is loaded and exported (a vision-language checkpoint's vision tower too).

    Raises:
        ModelDirError: an architecture that is neither a causal nor a masked language model, nor a
            vision-language model with one (``*ForConditionalGeneration``).
    """
    import transformers as tf

    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        autos = [tf.AutoModelForMaskedLM]
    elif any(a.endswith("ForConditionalGeneration") for a in archs):  # Gemma 3, Mistral 3, Qwen-VL, Llama 4...
        # not the causal LM: for a sequence-to-sequence model (Whisper, BART) that is its decoder alone
        autos = [tf.AutoModelForImageTextToText]
    else:
        autos = [tf.AutoModelForCausalLM, tf.AutoModelForImageTextToText]
    for auto in autos:
        if type(hf_config) in auto._model_mapping:
            return auto
    model_type = getattr(hf_config, "model_type", "?")
    raise ModelDirError(f"model type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not a language "
                        "model transformers builds with AutoModelForCausalLM or AutoModelForImageTextToText; "
                        "lora_dist fine-tunes decoder language models (and the language model of a vision one)")


def kept_in_fp32(modules: Iterable[str], strict: Iterable[str], dtype: torch.dtype | None):
    """Whether a tensor name is one a model keeps in fp32 when it is loaded, and so saved, in ``dtype``, as
    transformers decides it: ``modules`` (``_keep_in_fp32_modules``) under float16, ``strict``
    (``_keep_in_fp32_modules_strict``: routers' ``e_score_correction_bias``) under bfloat16 and float16; each a
    pattern searched for in the name, ``*`` standing for any characters. Never under float32 or None.

    Returns:
        A function of a tensor name giving True for a tensor kept in fp32.
    """
    patterns = list(strict) if dtype in (torch.bfloat16, torch.float16) else []
    patterns += list(modules) if dtype == torch.float16 else []
    if not patterns:
        return lambda name: False
    search = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns)).search
    return lambda name: search(name) is not None


def skeleton(base: ModelDir) -> torch.nn.Module:
    """The base's model with every parameter on the meta device: its names, shapes and conversion mapping, no memory.

    What reading a ``target_parameters`` adapter against its model needs (which parameters it adapts,
    and where the checkpoint stores them), without loading any weight.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return model_class(base.hf_config).from_config(base.hf_config)
