"""Sharding the frozen base and keeping the replicated LoRA in sync.

* :mod:`~lora_dist.parallel.parallelize`: ``parallelize``, the one wrapping entry point
  (activation checkpointing, then FSDP2 per block and the root, on a 1-D or hybrid
  ``dp_replicate x dp_shard`` mesh: ``dp_mesh_shape``).
* :mod:`~lora_dist.parallel.compile`: each transformer block compiled by ``torch.compile`` (``parallel.compile``).
* :mod:`~lora_dist.parallel.checkpointing`: activation checkpointing of the blocks, their
  checkpointed inputs optionally waiting in host memory (``parallel.offload_activations``).
* :mod:`~lora_dist.parallel.sharding`: which bytes of a base tensor a rank owns (FSDP2
  ``Shard(0)`` and ZeRO-3 flat partitions alike), for the sharded load and the export.
* :mod:`~lora_dist.parallel.reducer`: bucketed all-reduce of the LoRA gradients (fsdp2).
* :mod:`~lora_dist.parallel.engine`: one step interface per strategy, owning the training state.
* :mod:`~lora_dist.parallel.deepspeed`: everything DeepSpeed (config, ``zero.Init``, engine).
"""

from lora_dist.parallel.engine import Engine, ReplicaMismatchError, check_replicas, make_engine
from lora_dist.parallel.parallelize import dp_mesh_shape, find_blocks, parallelize, replicated_if_unsharded
from lora_dist.parallel.reducer import LoRAGradReducer
from lora_dist.parallel.sharding import OwnedRange, owned_range

__all__ = [
    "Engine",
    "LoRAGradReducer",
    "OwnedRange",
    "ReplicaMismatchError",
    "check_replicas",
    "deepspeed_config",
    "dp_mesh_shape",
    "find_blocks",
    "make_engine",
    "owned_range",
    "parallelize",
    "replicated_if_unsharded",
]


def __getattr__(name: str):
    if name == "deepspeed_config":  # imports nothing of DeepSpeed until asked
        from lora_dist.parallel.deepspeed import deepspeed_config

        return deepspeed_config
    raise AttributeError(f"module 'lora_dist.parallel' has no attribute {name!r}")
