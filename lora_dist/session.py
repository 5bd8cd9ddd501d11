"""The one setup of a training session: the sharded LoRA model, its optimizer and its engine.

``lora-dist train`` and every other loop (your own torch loop, :mod:`lora_dist.integrations`) set up
through here, in the documented order (``docs/architecture.md``): meta skeleton -> inject LoRA ->
shard -> each rank reads its own bytes of the base -> initialize LoRA -> AdamW over the LoRA params
-> the strategy's :class:`~lora_dist.parallel.Engine`. From then on a loop needs only the engine:
``no_sync``, ``backward``, ``step``, ``state_dict``/``load_state_dict``, ``save_adapter``, ``export_merged``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.nn as nn

from lora_dist.config import Config, ConfigError, ParallelConfig, TrainConfig, config_from_dict, config_to_dict
from lora_dist.integrations.accelerate import refuse_rewrap
from lora_dist.launch import LaunchEnv, init_distributed, run_device
from lora_dist.lora import LoRAConfig
from lora_dist.model import load_model
from lora_dist.model_dir import ModelDir, ModelDirError
from lora_dist.parallel import Engine, make_engine

__all__ = ["build", "check_launch", "open_base", "prepare", "resolve_hybrid", "resolve_strategy", "run_config",
           "strategy_config"]

log = logging.getLogger("lora_dist")


def run_config(model: str | os.PathLike | Config, lora: LoRAConfig | None = None, strategy: str | None = None, *,
               train: TrainConfig | None = None, parallel: ParallelConfig | None = None,
               dtype: str | None = None) -> Config:
    """The run config :func:`prepare` uses: ``model`` (a local HF model dir, or a whole :class:`Config`) with
    the given sections and settings in place of its own, validated as ``lora-dist train`` validates its config.

    Raises:
        ConfigError: an invalid value (an unknown strategy...), naming the key.
    """
    cfg = model if isinstance(model, Config) else Config()
    if not isinstance(model, Config):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=os.fspath(model)))
    if lora is not None:
        cfg = dataclasses.replace(cfg, lora=lora)
    if train is not None:
        cfg = dataclasses.replace(cfg, train=train)
    if parallel is not None:
        cfg = dataclasses.replace(cfg, parallel=parallel)
    if strategy is not None:
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, strategy=strategy))
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    return config_from_dict(config_to_dict(cfg))


def check_launch(cfg: Config, env: LaunchEnv) -> None:
    """Refuse a strategy that does not fit the launch (one line); warn where it does not shard the base.

    Raises:
        ConfigError: ``parallel.strategy=none`` with more than one process.
    """
    strategy = cfg.parallel.strategy
    if strategy == "none" and env.world_size > 1:
        raise ConfigError(f"parallel.strategy=none runs one process, but {env.world_size} were launched; pick fsdp2, zero3 or ddp")
    if strategy == "fsdp2":
        from lora_dist.parallel import dp_mesh_shape

        dp_mesh_shape(cfg.parallel, env.world_size)  # dp_replicate x dp_shard must be the ranks launched
    if strategy in ("zero1", "zero2") and env.is_main:
        log.warning("parallel.strategy=%s does not shard the frozen base: every rank holds all of it "
                    "(only the small LoRA optimizer state/gradients are partitioned); use fsdp2 or zero3 to shard it",
                    strategy)


def open_base(cfg: Config) -> ModelDir:
    """The base model dir, opened once (fails fast on a missing, incomplete or corrupt dir).

    Raises:
        ModelDirError: ``model.path`` is unset, missing or not a usable HF model dir.
    """
    if not cfg.model.path:
        raise ModelDirError("model.path is not set; pass model.path=/path/to/hf_checkpoint")
    return ModelDir(cfg.model.path)


def resolve_strategy(cfg: Config, env: LaunchEnv, device: torch.device) -> Config:
    """``cfg`` with ``parallel.strategy=auto`` resolved by the planner (:func:`lora_dist.plan.choose_strategy`),
    logged on rank 0 with each candidate's predicted peak; any other config unchanged.

    The budget is ``parallel.memory_gb``, else the device's memory (:func:`lora_dist.plan.memory_budget`), the
    smallest over the ranks, so every rank makes the same choice (collective when ``auto``).

    Raises:
        ConfigError: no candidate fits the budget (on every rank), naming the smallest peak and the fixes.
    """
    if cfg.parallel.strategy != "auto":
        return cfg
    from lora_dist.plan import choose_strategy

    budget, _ = _budget(cfg, env, device)
    parallel, choice = choose_strategy(cfg, env.world_size, budget)
    if env.is_main:
        log.info("%s", choice.summary())
    return dataclasses.replace(cfg, parallel=parallel)


def _budget(cfg: Config, env: LaunchEnv, device: torch.device) -> tuple[int, bool]:
    """Collective: the memory budget per rank, the smallest over the ranks; and whether the ranks lie node by node
    (``local_world_size`` consecutive ranks per node, the same on every node)."""
    import torch.distributed as dist

    from lora_dist.plan import memory_budget

    budget = memory_budget(cfg.parallel.memory_gb, device, env.local_world_size)
    local = env.local_world_size
    aligned = local > 0 and env.world_size % local == 0 and env.node_rank == env.rank // local
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = torch.tensor([budget, local, -local, int(aligned)], dtype=torch.int64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        budget, low, high, aligned = (int(v) for v in values.tolist())
        aligned = bool(aligned) and low == -high
    return budget, aligned


def resolve_hybrid(cfg: Config, env: LaunchEnv, device: torch.device) -> Config:
    """``cfg`` with fsdp2's ``parallel.dp_replicate`` and ``parallel.dp_shard`` set for this launch, logged on rank 0
    when chosen. :func:`build` calls it after :func:`resolve_strategy`; a run's ``config.json`` keeps the values
    as given (0: chosen again by the launch that reuses it).

    Unset (both 0) on several nodes: one replica group per node (hybrid sharding, so only LoRA gradients cross
    nodes) when the planner (:func:`lora_dist.plan.plan_memory`) predicts the model fits the budget sharded over
    one node's ranks, else the base sharded over all ranks. Collective when it decides. ``parallel.reshard_after_forward=node``
    becomes the launch's ranks per node. Over one shard rank fsdp2 becomes none / ddp
    (:func:`~lora_dist.parallel.replicated_if_unsharded`), logged on rank 0.

    Raises:
        ConfigError: ``dp_replicate x dp_shard`` is not the world size.
    """
    from lora_dist.parallel import dp_mesh_shape, replicated_if_unsharded

    p = cfg.parallel
    if p.strategy != "fsdp2":
        return cfg
    auto = not p.dp_replicate and not p.dp_shard
    if auto and env.world_size > 1 and env.num_nodes > 1:
        from lora_dist.plan import GB, plan_memory

        budget, aligned = _budget(cfg, env, device)
        local = env.local_world_size
        if not aligned:
            why = "the nodes do not hold equal runs of consecutive ranks"
        else:
            single = dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp_replicate=1, dp_shard=0))
            try:
                peak = plan_memory(single, local).total
            except Exception as e:  # noqa: BLE001 - a model the planner cannot size: the safe choice, logged
                peak, fits, why = 0, False, f"the planner could not size the model ({type(e).__name__}: {e})"
            else:
                fits = peak <= budget
                why = (f"the model {'fits' if fits else 'does not fit'} in one node's {local} ranks (predicted peak "
                       f"{peak / GB:.2f} GB per rank, budget {budget / GB:.2f} GB, parallel.memory_gb)")
            if fits:
                p = dataclasses.replace(p, dp_replicate=env.world_size // local, dp_shard=local)
        if env.is_main:
            if p.dp_replicate > 1:
                log.info("parallel: hybrid sharding, dp_replicate=%d x dp_shard=%d (one replica group per node): %s; "
                         "only LoRA gradients cross nodes", p.dp_replicate, p.dp_shard, why)
            else:
                log.info("parallel: the base sharded over all %d ranks of %d nodes (dp_replicate=1): %s; "
                         "parallel.reshard_after_forward=node keeps backward's all-gathers inside a node",
                         env.world_size, env.num_nodes, why)
    replicated = replicated_if_unsharded(p, env.world_size, cfg.model.dtype)
    if replicated is not p:
        if env.is_main:
            log.info("parallel: fsdp2 over one shard rank shards nothing; running as %s (the same math, without "
                     "FSDP2's copies of every weight each step; parallel.cpu_offload or the bf16 cast of a "
                     "non-bf16 base keeps FSDP2)", replicated.strategy)
        return dataclasses.replace(cfg, parallel=replicated)
    replicate, shard = dp_mesh_shape(p, env.world_size)
    reshard = p.reshard_after_forward
    if reshard == "node" and env.local_world_size > 0:
        reshard = env.local_world_size  # parallelize() reads no launch environment: the node's rank count
    return dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp_replicate=replicate, dp_shard=shard,
                                                                 reshard_after_forward=reshard))


def strategy_config(cfg: Config, base: ModelDir) -> dict | None:
    """The DeepSpeed config of ``zero*`` (:func:`~lora_dist.parallel.deepspeed.deepspeed_config`); else None."""
    if not cfg.parallel.strategy.startswith("zero"):
        return None
    from lora_dist.parallel.deepspeed import deepspeed_config

    return deepspeed_config(cfg, base.hf_config)


def build(cfg: Config, env: LaunchEnv, device: torch.device, base: ModelDir,
          ds_config: dict | None) -> tuple[nn.Module, Engine]:
    """Resolve ``parallel.strategy=auto`` (:func:`resolve_strategy`) and fsdp2's mesh (:func:`resolve_hybrid`),
    load the model
    (:func:`~lora_dist.model.load_model`), make AdamW over its LoRA params and the engine.

    Every rank calls it, with inputs already checked (:func:`check_launch`, :func:`open_base`).
    """
    cfg = resolve_strategy(cfg, env, device)  # auto is never zero*: ds_config stays None
    cfg = resolve_hybrid(cfg, env, device)  # fsdp2's dp_replicate x dp_shard for this launch (or ddp / none)
    t = cfg.train
    loaded = load_model(cfg.model, cfg.lora, cfg.parallel, device, t.seed, ds_config, base=base)
    if env.is_main:
        log.info("%s", loaded.report)
    model = loaded.model
    lora_params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    engine = make_engine(model, optimizer, cfg.parallel, t, device, ds_config, base=base)
    refuse_rewrap(model)  # the engine owns the wrapping and the gradient reduction
    return model, engine


def prepare(model: str | os.PathLike | Config, lora: LoRAConfig | None = None, strategy: str | None = None, *,
            train: TrainConfig | None = None, parallel: ParallelConfig | None = None, dtype: str | None = None,
            env: LaunchEnv | None = None) -> tuple[nn.Module, Engine]:
    """The sharded LoRA model and its engine, for your own training loop; call on every rank.

    The same setup ``lora-dist train`` runs (:func:`build`). Initializes ``torch.distributed`` from the
    launcher (torchrun, Slurm, MPI, or one process) unless it already is.

    Args:
        model: a local HF model dir, or a :class:`Config` (its ``model``, ``lora``, ``parallel``, ``train``).
        lora: what to adapt (default: the config's, ``LoRAConfig()``).
        strategy: ``fsdp2``, ``zero3``, ``zero1``, ``zero2``, ``ddp``, ``none`` or ``auto`` (the fastest that fits
            ``parallel.memory_gb``, :func:`resolve_strategy`) (default: the config's).
        train: ``lr``, ``weight_decay``, ``max_grad_norm``, ``seed``; ``micro_batch_size`` and ``grad_accum``
            matter to ``zero*`` (DeepSpeed counts micro-steps).
        parallel: the strategy's options (mixed precision, activation checkpointing, buckets...).
        dtype: the base model's dtype (``model.dtype``).
        env: the launch environment, if the caller initialized it.

    Returns:
        ``(model, engine)``: the unwrapped LoRA model, and the engine that trains it. Run the forward through
        ``engine.model`` (the strategy's wrapper where there is one).

    Raises:
        ConfigError, ModelDirError, LaunchError: bad input or launch, one line, before any model is built.
    """
    cfg = run_config(model, lora, strategy, train=train, parallel=parallel, dtype=dtype)
    env = env or init_distributed(cfg.parallel.timeout_s, allow_batch_shell=False)
    check_launch(cfg, env)
    base = open_base(cfg)
    return build(cfg, env, run_device(), base, strategy_config(cfg, base))
