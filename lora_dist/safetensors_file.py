"""Writing the safetensors format: the header, and whole files written in a stream with every error raised.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype, shape
and byte range (padded with spaces to 8 bytes), then the raw little-endian tensor bytes. The merged export
plans its files from headers alone (:mod:`lora_dist.export.layout`); adapters and training checkpoints are
written whole by :func:`write_safetensors`.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Iterable, Mapping, Sequence

import torch

from lora_dist.dtypes import to_safetensors

__all__ = ["MAX_HEADER", "SafetensorsFormatError", "encode_header", "tensor_bytes", "write_safetensors"]

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
    ordered = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    entries, cursor = [], 0
    for name, t in ordered:
        n = t.numel() * t.element_size()
        entries.append((name, t.dtype, t.shape, cursor, cursor + n))
        cursor += n
    header = encode_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for _, t in ordered:
            if t.numel():
                f.write(tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())
