"""The byte layout of merged checkpoint files: planned up front (every rank the same plan), filled piecewise.

A safetensors file is an 8-byte little-endian header length, a JSON header
naming every tensor's dtype, shape and byte range, then the raw tensor bytes.
Because the header only needs dtypes and shapes, the whole layout of a sharded
Hugging Face checkpoint (which tensor goes to which file, at which byte
offset) can be computed before any tensor exists. :func:`plan_layout` does
that deterministically, so every rank computes the same plan with no
communication; :func:`create_file` writes a header and sizes the file, and
:func:`pwrite_tensor` lets any process fill its own byte range of it.

Sharding into files follows ``huggingface_hub``/``transformers``: tensors are
taken in order and a new file starts when the next tensor would push the
current one past ``max_shard_size`` (a tensor larger than the limit gets a file
of its own); files are ``model-0000i-of-0000N.safetensors`` with a
``model.safetensors.index.json``, or a single ``model.safetensors``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_dist.model_dir import SAFE_SINGLE
from lora_dist.safetensors_file import file_layout, tensor_bytes

__all__ = [
    "CheckpointLayout",
    "ShardFile",
    "TensorSpec",
    "create_file",
    "format_size",
    "parse_size",
    "plan_layout",
    "pwrite_tensor",
]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def format_size(n: int) -> str:
    """``n`` bytes in decimal units, as HF's sizes are written: "4.40 MB", "1.02 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def parse_size(size: int | str) -> int:
    """Bytes in a size like HF's ``max_shard_size``: decimal units ("5GB" = 5e9, "200KB"), or KiB/MiB/GiB.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or '200KB'")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.numel * self.itemsize


@dataclass(frozen=True)
class ShardFile:
    """One output file: its name, encoded header, total size and tensors."""

    name: str
    header: bytes
    size: int
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointLayout:
    """Where every tensor of a checkpoint goes: file and absolute byte offset of its data."""

    files: tuple[ShardFile, ...]
    specs: dict[str, TensorSpec]
    file_of: dict[str, str]
    offset_of: dict[str, int]

    @property
    def total_size(self) -> int:
        """Sum of tensor bytes (what HF's index calls ``total_size``)."""
        return sum(s.nbytes for s in self.specs.values())

    @property
    def total_parameters(self) -> int:
        """Sum of tensor elements (the index's ``total_parameters``)."""
        return sum(s.numel for s in self.specs.values())

    @property
    def file_bytes(self) -> int:
        """Bytes of all files, headers included (what the disk must hold)."""
        return sum(f.size for f in self.files)

    def index(self) -> dict | None:
        """The ``model.safetensors.index.json`` content, or None for a single file."""
        if len(self.files) == 1 and self.files[0].name == SAFE_SINGLE:
            return None
        return {
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
            "weight_map": {name: self.file_of[name] for name in sorted(self.file_of)},
        }

    def fingerprint(self) -> str:
        """A string equal on every rank iff the ranks planned the same layout."""
        return json.dumps([[s.name, str(s.dtype), list(s.shape), self.file_of[s.name], self.offset_of[s.name]]
                           for s in self.specs.values()])


def plan_layout(
    specs: Sequence[TensorSpec], max_shard_size: int | str, metadata: Mapping[str, str]
) -> CheckpointLayout:
    """Split ``specs`` (in order) into files of at most ``max_shard_size`` bytes and lay each file out.

    Each file is laid out by :func:`lora_dist.safetensors_file.file_layout`.
    """
    limit = parse_size(max_shard_size)
    groups: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in specs:
        if spec.nbytes > limit:
            groups.append([spec])
            continue
        if current and current_size + spec.nbytes > limit:
            groups.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += spec.nbytes
    if current or not groups:
        groups.append(current)
    n = len(groups)
    names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    files, file_of, offset_of = [], {}, {}
    for name, group in zip(names, groups):
        header, placed, size = file_layout([(s.name, s.dtype, s.shape) for s in group], metadata)
        for key, begin, _ in placed:
            file_of[key] = name
            offset_of[key] = begin
        files.append(ShardFile(name, header, size, tuple(s.name for s in group)))
    return CheckpointLayout(tuple(files), {s.name: s for s in specs}, file_of, offset_of)


def create_file(path: Path, shard: ShardFile) -> None:
    """Write the header and size the file (sparse); data bytes are filled in later by :func:`pwrite_tensor`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _pwrite_all(fd, memoryview(shard.header), 0)
        os.ftruncate(fd, shard.size)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        if written <= 0:  # pragma: no cover - pwrite raises on real errors
            raise OSError(errno.EIO, "short write")
        data, offset = data[written:], offset + written


def pwrite_tensor(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write a tensor's raw bytes (native little-endian layout) at ``offset`` of an open file."""
    if tensor.numel():
        _pwrite_all(fd, tensor_bytes(tensor), offset)
