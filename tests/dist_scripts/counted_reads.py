"""The bytes a rank reads from a checkpoint's files while it loads the model (the dist scripts' check that a
rank reads only its own rows or partitions)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lora_dist.model_dir import ModelDir


@contextlib.contextmanager
def counted_reads() -> Iterator[dict[str, int]]:
    """Counts every ``ModelDir.read`` in the block into the yielded ``{"bytes": N}``."""
    counter = {"bytes": 0}
    read = ModelDir.read

    def counted(self, key, rows=None):
        tensor = read(self, key, rows)
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    ModelDir.read = counted
    try:
        yield counter
    finally:
        ModelDir.read = read
