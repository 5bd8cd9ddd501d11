"""The safetensors format: headers encoded and laid out, whole files written in a stream with every error raised,
and headers read back and checked against the file.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype, shape
and byte range (padded with spaces to 8 bytes), then the raw little-endian tensor bytes. The merged export
plans its files from headers alone (:mod:`lora_dist.export.layout`); adapters and training checkpoints are
written whole by :func:`write_safetensors`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from lora_dist.dtypes import from_safetensors, to_safetensors

__all__ = ["MAX_HEADER", "HeaderEntry", "SafetensorsFormatError", "encode_header", "file_layout", "read_header",
           "tensor_bytes", "write_safetensors"]

MAX_HEADER = 100 * 1000 * 1000  # safetensors refuses larger headers


class SafetensorsFormatError(ValueError):
    """A safetensors file whose header or size is not what the format requires."""


def encode_header(entries: Iterable[tuple[str, torch.dtype, Sequence[int], int, int]],
                  metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + JSON header padded with spaces to 8 bytes (as safetensors does).

    Args:
        entries: ``(name, dtype, shape, begin, end)`` per tensor, byte offsets relative to the data region.
        metadata: the header's ``__metadata__`` (string values), if any.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsFormatError(f"safetensors metadata must map strings to strings, got {dict(metadata)!r:.200}")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    for name, dtype, shape, begin, end in entries:
        if name == "__metadata__":
            raise SafetensorsFormatError("a tensor may not be named __metadata__ in safetensors")
        header[name] = {"dtype": to_safetensors(dtype), "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER:
        raise SafetensorsFormatError(f"safetensors header of {len(text)} bytes exceeds the format's limit")
    return struct.pack("<Q", len(text)) + text


def file_layout(tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None
                ) -> tuple[bytes, list[tuple[str, int, int]], int]:
    """The header of one safetensors file holding ``tensors`` (name, dtype, shape), and where each one's bytes go.

    Tensors are stored by decreasing item size, in their given order within one size, so every tensor starts
    aligned to its dtype (the header is padded to 8 bytes).

    Returns:
        ``(header, placed, size)``: the header with its length prefix; ``(name, begin, end)`` absolute byte
        offsets, in storage order; the file's size.
    """
    entries, cursor = [], 0
    for name, dtype, shape in sorted(tensors, key=lambda t: -t[1].itemsize):  # a stable sort
        n = math.prod(shape) * dtype.itemsize
        entries.append((name, dtype, shape, cursor, cursor + n))
        cursor += n
    header = encode_header(entries, metadata)
    return header, [(name, len(header) + b, len(header) + e) for name, _, _, b, e in entries], len(header) + cursor


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw bytes as safetensors stores them (native little-endian layout, on the CPU)."""
    if sys.byteorder != "little":  # pragma: no cover
        raise SafetensorsFormatError("writing safetensors requires a little-endian machine")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, tensor by tensor, and fail if any part of the write fails.

    safetensors' ``save_file`` drops the error of the file's close, which is where a network filesystem (NFS)
    reports a write it could not complete; the file would then be published short. Here Python writes,
    fsyncs and closes the file, and raises on each. Tensors are stored by decreasing item size (each starts
    aligned to its dtype), and streamed: no serialized copy of the whole file is held in memory.
    """
    header, placed, _ = file_layout([(name, t.dtype, t.shape) for name, t in tensors.items()], metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name, _, _ in placed:
            if tensors[name].numel():
                f.write(tensor_bytes(tensors[name]))
        f.flush()
        os.fsync(f.fileno())


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
