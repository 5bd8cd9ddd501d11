"""lora_dist: distributed LoRA fine-tuning.

LoRA is injected before FSDP2 / DeepSpeed ZeRO wrapping, so the frozen base is
sharded with no gradients and no optimizer state while the small A/B params
stay replicated and all-reduced; merged checkpoints are written from the
sharded state, each rank merging its own shard.

Where things live (``docs/architecture.md`` has the map): LoRA math ``lora``/``merge``,
PEFT-format adapters ``adapter``, config ``config``, user errors ``errors``, launching
``launch/``, which bytes a rank owns ``sharding``, the wrapping and the per-strategy engines
``parallel/``, QLoRA ``quant``/``nf4``, base model dirs ``model_dir``, model setup ``model``,
data ``data``, the training loop ``train``, training checkpoints ``checkpoint``, merged export,
offline merge and verify ``export/``, atomic writes ``atomic``, dtypes ``dtypes``, the command
line ``cli``. Your own loop starts at ``prepare``
(``session``); HF Trainer/TRL and accelerate are in ``integrations/`` (``docs/integrations.md``).
"""

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Engine",
    "InjectionReport",
    "LoRAConfig",
    "LoRALinear",
    "LoRAWeights",
    "ParallelConfig",
    "TrainConfig",
    "destroy_distributed",
    "exit_distributed",
    "disable_adapters",
    "export_merged",
    "export_run",
    "init_distributed",
    "inject_lora",
    "load_adapter",
    "load_config",
    "load_model",
    "lora_delta",
    "lora_parameters",
    "lora_state_dict",
    "merge_offline",
    "merge_state_dict",
    "merge_weight",
    "parallelize",
    "prepare",
    "read_adapter",
    "save_adapter",
    "train",
    "verify_checkpoint",
]

# Every name is imported on first use: `import lora_dist` (and the CLI's start, `lora_dist.cli`) loads no torch, so
# the CLI holds stop signals from its first moment (lora_dist.preemption.hold_stop_signals).
_LAZY = {
    **{name: "lora_dist.adapter" for name in ("load_adapter", "lora_state_dict", "read_adapter", "save_adapter")},
    **{name: "lora_dist.config" for name in ("Config", "ParallelConfig", "TrainConfig", "load_config")},
    **{name: "lora_dist.lora" for name in ("InjectionReport", "LoRAConfig", "LoRALinear", "disable_adapters",
                                           "inject_lora", "lora_parameters")},
    **{name: "lora_dist.merge" for name in ("LoRAWeights", "lora_delta", "merge_state_dict", "merge_weight")},
    "train": "lora_dist.train",
    "parallelize": "lora_dist.parallel",
    "Engine": "lora_dist.parallel",
    "prepare": "lora_dist.session",
    "load_model": "lora_dist.model",
    "init_distributed": "lora_dist.launch",
    "destroy_distributed": "lora_dist.launch",
    "exit_distributed": "lora_dist.launch",
    "export_merged": "lora_dist.export",
    "export_run": "lora_dist.session",
    "merge_offline": "lora_dist.export",
    "verify_checkpoint": "lora_dist.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_dist' has no attribute {name!r}")
