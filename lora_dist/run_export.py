"""``lora-dist export RUN_DIR``: the merged checkpoint of a finished run, written from the sharded state.

Run it under the same launcher as training (``torchrun``, ``srun``, ``mpirun``)
or as one process: the base is rebuilt sharded across the ranks exactly as in
training, the run's LoRA weights are loaded on every rank, and each rank merges
the shards it owns (:func:`lora_dist.export.export_merged`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_dist.adapter import read_adapter
from lora_dist.config import ConfigError, config_from_dict
from lora_dist.launch import init_distributed
from lora_dist.lora import lora_modules
from lora_dist.model import load_model
from lora_dist.parallel import deepspeed_config

__all__ = ["export_run"]


def _run_lora_tensors(run: Path) -> dict[str, torch.Tensor]:
    """The run's final adapter, or its latest checkpoint's LoRA weights."""
    if (run / "adapter").is_dir():
        return read_adapter(run / "adapter").tensors
    latest = run / "checkpoints" / "latest"
    if latest.is_file():
        return load_file(str(run / "checkpoints" / latest.read_text().strip() / "lora.safetensors"))
    raise ConfigError(f"{run} has neither adapter/ nor checkpoints/latest; is it a lora-dist output.dir?")


def export_run(run_dir: str | Path, out: str | Path | None = None, dtype: str | None = None,
               max_shard_size: str | None = None, overwrite: bool = False) -> Path:
    """Write ``RUN_DIR/merged`` (or ``out``) from a finished run; call on every rank."""
    from lora_dist.export import export_merged, parse_dtype

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"{run}/config.json not found; RUN_DIR must be a lora-dist output.dir")
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    env = init_distributed(cfg.parallel.timeout_s)
    parallel = cfg.parallel
    if env.world_size > 1 and parallel.strategy == "none":
        parallel.strategy = "fsdp2"
    if env.world_size == 1:
        parallel.strategy = "none"
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    ds = None
    if parallel.strategy.startswith("zero"):
        from transformers import AutoConfig

        from lora_dist.train import _max_lora_numel

        ds = deepspeed_config(parallel, cfg.train, _max_lora_numel(cfg, AutoConfig.from_pretrained(cfg.model.path)))
    model = load_model(cfg.model, cfg.lora, parallel, device, cfg.train.seed, ds).model
    tensors = _run_lora_tensors(run)
    with torch.no_grad():
        for name, layer in lora_modules(model):
            for part in ("lora_A", "lora_B"):
                key = f"{name}.{part}.weight"
                if key not in tensors:
                    raise ConfigError(f"{run}: no {key}; the run's adapter does not match its config")
                weight = getattr(layer, part).weight
                if tensors[key].shape != weight.shape:
                    raise ConfigError(f"{run}: {key} is {tuple(tensors[key].shape)} in the run's adapter but "
                                      f"{tuple(weight.shape)} in the model its config builds; was config.json edited?")
                weight.copy_(tensors[key])
    return export_merged(
        model, Path(out) if out else run / "merged", cfg.model.path,
        dtype=parse_dtype(dtype or cfg.export.dtype),
        max_shard_size=max_shard_size or cfg.export.max_shard_size,
        overwrite=overwrite or cfg.output.overwrite,
    )
