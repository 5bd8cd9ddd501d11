"""Reading local Hugging Face model dirs (a base model, or a merged export) without loading them whole.

A model dir is ``config.json`` plus ``model.safetensors`` or sharded
``model-0000i-of-0000N.safetensors`` files with ``model.safetensors.index.json``.
:class:`ModelDir` reads one tensor, some of its rows, or a flat element
range at a time, straight from the memory-mapped files, so a rank only ever
touches the bytes it owns.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from lora_dist.dtypes import from_safetensors

__all__ = ["SAFE_INDEX", "SAFE_SINGLE", "ModelDir", "ModelDirError"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class ModelDirError(ValueError):
    """A model dir that is missing, incomplete or corrupt."""


class ModelDir:
    """Lazy, tensor-at-a-time access to a local HF safetensors model dir.

    Open it once and hand it on: the loader, the export and the checks all read through it.

    Args:
        path: the model dir.

    Raises:
        ModelDirError: no config.json, no safetensors weights (pickled
            ``pytorch_model.bin`` is refused), an index naming missing files,
            or an unreadable safetensors header.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelDirError(f"model path {str(self.path)!r} is not a directory; set model.path to a local HF checkpoint dir")
        if not (self.path / "config.json").is_file():
            raise ModelDirError(f"{self.path} has no config.json; model.path must be a Hugging Face checkpoint dir")
        index = self.path / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelDirError(f"{index} is corrupt ({e}); re-save the checkpoint") from None
        elif (self.path / SAFE_SINGLE).is_file():
            weight_map = None
        else:
            pickled = list(self.path.glob("pytorch_model*.bin"))
            hint = " (only pickled .bin weights found: lora_dist never unpickles; convert them to safetensors)" if pickled else ""
            raise ModelDirError(f"{self.path} has no safetensors weights{hint}")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            handle = self._open(SAFE_SINGLE)
            weight_map = {k: SAFE_SINGLE for k in handle.keys()}  # type: ignore[attr-defined]
        self.weight_map: dict[str, str] = dict(weight_map)
        for file in sorted(set(self.weight_map.values())):
            self._open(file)

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

    def config(self) -> dict:
        """``config.json`` as a dict."""
        return json.loads((self.path / "config.json").read_text())

    @functools.cached_property
    def hf_config(self):
        """The ``transformers`` config (``AutoConfig``) of the model, read once."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _slice(self, key: str):
        if key not in self.weight_map:
            raise ModelDirError(f"tensor {key!r} is not in {self.path}")
        return self._handles[self.weight_map[key]].get_slice(key)  # type: ignore[attr-defined]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * from_safetensors(self.dtype(key)).itemsize

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor, or rows ``rows`` of its first dimension, reading only those bytes."""
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

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in file order, one at a time."""
        for file in self.files():
            handle = self._handles[file]
            for key in handle.keys():  # type: ignore[attr-defined]
                yield key, handle.get_tensor(key)  # type: ignore[attr-defined]
