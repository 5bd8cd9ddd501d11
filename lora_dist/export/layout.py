"""The byte layout of safetensors checkpoint files: planned up front, filled piecewise, read back checked.

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
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_dist.dtypes import from_safetensors
from lora_dist.model_dir import SAFE_SINGLE
from lora_dist.safetensors_file import MAX_HEADER, SafetensorsFormatError, tensor_bytes
from lora_dist.safetensors_file import encode_header as _encode_header

__all__ = [
    "CheckpointLayout",
    "HeaderEntry",
    "SafetensorsFormatError",
    "ShardFile",
    "TensorSpec",
    "create_file",
    "encode_header",
    "format_size",
    "parse_size",
    "plan_layout",
    "pwrite_tensor",
    "read_header",
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


def encode_header(entries: Sequence[tuple[TensorSpec, int, int]], metadata: Mapping[str, str]) -> bytes:
    """:func:`lora_dist.safetensors_file.encode_header` of ``(spec, begin, end)`` entries."""
    return _encode_header(((spec.name, spec.dtype, spec.shape, begin, end) for spec, begin, end in entries), metadata)


def plan_layout(
    specs: Sequence[TensorSpec], max_shard_size: int | str, metadata: Mapping[str, str]
) -> CheckpointLayout:
    """Split ``specs`` (in order) into files of at most ``max_shard_size`` bytes and lay each file out.

    Within a file tensors are stored by decreasing item size, so every tensor
    starts aligned to its dtype (the header is padded to 8 bytes).
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
        ordered = sorted(enumerate(group), key=lambda t: (-t[1].itemsize, t[0]))
        entries, cursor = [], 0
        for _, spec in ordered:
            entries.append((spec, cursor, cursor + spec.nbytes))
            cursor += spec.nbytes
        header = encode_header(entries, metadata)
        for spec, begin, _ in entries:
            file_of[spec.name] = name
            offset_of[spec.name] = len(header) + begin
        files.append(ShardFile(name, header, len(header) + cursor, tuple(s.name for s in group)))
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


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as a safetensors header describes it; offsets are absolute in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> tuple[dict[str, str], dict[str, HeaderEntry]]:
    """Parse and validate a safetensors file's header against the file size.

    Checks what loaders rely on: a readable JSON header, known dtypes, byte
    ranges that match each tensor's shape and dtype and tile the data region
    exactly, and a file exactly as long as the header says.

    Returns:
        ``(metadata, entries)`` with absolute byte offsets.

    Raises:
        SafetensorsFormatError: naming the file and what is wrong.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path.name}: {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(MAX_HEADER, size - 8):
            raise SafetensorsFormatError(
                f"{path.name}: header length {n} is larger than the file; the header is corrupt"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsFormatError(f"{path.name}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, HeaderEntry] = {}
    for name, info in header.items():
        try:
            dtype = from_safetensors(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, SafetensorsFormatError) as e:
            raise SafetensorsFormatError(f"{path.name}: header entry {name!r} is malformed ({e})") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise SafetensorsFormatError(
                f"{path.name}: {name!r} spans {end - begin} bytes, but shape {list(shape)} "
                f"{info['dtype']} needs {expected}"
            )
        entries[name] = HeaderEntry(info["dtype"], shape, data_start + begin, data_start + end)
    cursor = data_start
    for name, entry in sorted(entries.items(), key=lambda kv: kv[1].begin):
        if entry.begin != cursor:
            raise SafetensorsFormatError(
                f"{path.name}: {name!r} starts at byte {entry.begin}, expected {cursor} (gap or overlap)"
            )
        cursor = entry.end
    if cursor != size:
        raise SafetensorsFormatError(
            f"{path.name}: file is {size} bytes but its header describes {cursor}; the file is truncated or padded"
        )
    return metadata, entries
