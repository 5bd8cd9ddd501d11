"""Sharding the frozen base and keeping the replicated LoRA in sync.

* :mod:`~lora_dist.parallel.parallelize`: ``parallelize``, the one wrapping entry point
  (activation checkpointing, then FSDP2 per block and the root, on a 1-D or hybrid
  ``dp_replicate x dp_shard`` mesh: ``dp_mesh_shape``).
* :mod:`~lora_dist.parallel.compile`: each transformer block compiled by ``torch.compile`` (``parallel.compile``).
* :mod:`~lora_dist.parallel.checkpointing`: activation checkpointing of the blocks, their
  checkpointed inputs optionally waiting in host memory (``parallel.offload_activations``).
* :mod:`~lora_dist.parallel.reducer`: bucketed all-reduce of the LoRA gradients (fsdp2).
* :mod:`~lora_dist.parallel.engine`: one step interface per strategy, owning the training state.
* :mod:`~lora_dist.parallel.deepspeed`: everything DeepSpeed (config, ``zero.Init``, engine).

Which bytes of a base tensor a rank then owns (FSDP2 ``Shard(0)`` and ZeRO-3 flat partitions alike) is
:mod:`lora_dist.sharding`: the sharded load, the export and the LoRA layers read it below this package.
"""

from lora_dist.parallel.engine import Engine, ReplicaMismatchError, check_replicas
from lora_dist.parallel.parallelize import dp_mesh_shape, parallelize, replicated_if_unsharded
from lora_dist.parallel.reducer import LoRAGradReducer

__all__ = [
    "Engine",
    "LoRAGradReducer",
    "ReplicaMismatchError",
    "check_replicas",
    "deepspeed_config",
    "dp_mesh_shape",
    "parallelize",
    "replicated_if_unsharded",
]


def __getattr__(name: str):
    if name == "deepspeed_config":  # imports nothing of DeepSpeed until asked
        from lora_dist.parallel.deepspeed import deepspeed_config

        return deepspeed_config
    raise AttributeError(f"module 'lora_dist.parallel' has no attribute {name!r}")
