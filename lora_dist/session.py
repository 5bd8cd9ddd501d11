"""The one setup of a training session: the sharded LoRA model, its optimizer and its engine.

``lora-dist train`` and every other loop (your own torch loop, :mod:`lora_dist.integrations`) set up
through here, in the documented order (``docs/architecture.md``): meta skeleton -> inject LoRA ->
shard -> each rank reads its own bytes of the base -> initialize LoRA -> AdamW over the LoRA params
-> the strategy's :class:`~lora_dist.parallel.Engine`. From then on a loop needs only the engine:
``no_sync``, ``backward``, ``step``, ``state_dict``/``load_state_dict``, ``save_adapter``, ``export_merged``.

:func:`export_run` (``lora-dist export RUN_DIR``) rebuilds a finished run's model the same way, from the config
the run saved, loads its LoRA weights and writes the merged checkpoint from the shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file

from lora_dist.adapter import (adapter_chat_template, adapter_nf4_record, adapter_step, installed_peft_misreads,
                                peft_misread, read_adapter)
from lora_dist.atomic import recover
from lora_dist.checkpoint import STEP_DIR, ResumeError, nf4_record_of, read_checkpoint, read_state
from lora_dist.config import (Config, ParallelConfig, TrainConfig, config_from_dict, config_to_dict,
                              recorded_config)
from lora_dist.dtypes import parse_dtype
from lora_dist.errors import ConfigError
from lora_dist.export import export_merged, merge_offline
from lora_dist.chat import ChatError, configured_template
from lora_dist.export.target import check_output
from lora_dist.integrations.accelerate import refuse_rewrap
from lora_dist.launch import LaunchEnv, init_distributed, run_device
from lora_dist.lora import LoRAConfig, lora_modules
from lora_dist.loss import ShardedHeadLoss
from lora_dist.model import base_dropout, check_layer_drop, load_model
from lora_dist.model_dir import ModelDir, ModelDirError
from lora_dist.parallel import Engine
from lora_dist.parallel.engine import DDPEngine, FSDP2Engine
from lora_dist.quant import NF4Record
from lora_dist.ranks import RankGroup

__all__ = ["build", "check_launch", "export_run", "make_engine", "open_base", "prepare", "resolve_hybrid",
           "resolve_launch", "resolve_strategy", "run_config", "strategy_config"]

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
        ConfigError: ``parallel.strategy=none`` with more than one process; a ``parallel.deepspeed_config`` file
            that is missing, malformed, of another ZeRO stage or of another precision than ``model.dtype`` and
            ``parallel.mixed_precision``.
    """
    strategy = cfg.parallel.strategy
    if cfg.parallel.deepspeed_config:  # before any work (the data is tokenized next)
        from lora_dist.parallel.deepspeed import user_deepspeed_config

        user_deepspeed_config(cfg)
    if strategy == "none" and env.world_size > 1:
        raise ConfigError(f"parallel.strategy=none runs one process, but {env.world_size} were launched; pick fsdp2, zero3 or ddp")
    if strategy == "fsdp2":
        from lora_dist.parallel import dp_mesh_shape

        dp_mesh_shape(cfg.parallel, env.world_size)  # dp_replicate x dp_shard must be the ranks launched
    if (strategy in ("ddp", "none") and cfg.parallel.mixed_precision == "bfloat16" and cfg.model.dtype != "bfloat16"
            and env.is_main):
        log.warning("parallel.mixed_precision=bfloat16 is not applied under parallel.strategy=%s: the base computes "
                    "in model.dtype=%s; use model.dtype=bfloat16, or fsdp2, which casts it", strategy, cfg.model.dtype)
    if strategy in ("zero1", "zero2") and env.is_main:
        log.warning("parallel.strategy=%s does not shard the frozen base: every rank holds all of it "
                    "(only the small LoRA optimizer state/gradients are partitioned); use fsdp2 or zero3 to shard it",
                    strategy)


def open_base(cfg: Config, env: LaunchEnv | None = None) -> ModelDir:
    """The base model dir, opened once (fails fast on a missing, incomplete or corrupt dir).

    With ``env`` of several ranks it is collective: a rank that cannot open its copy fails every rank, naming
    it (not only its own, while the others wait on a collective), and where the ranks run on several nodes
    their copies must be the same checkpoint (:func:`check_same_base`).

    Raises:
        ModelDirError: ``model.path`` is unset, missing or not a usable HF model dir (on any rank), or the
            nodes hold different checkpoints there.
    """
    if not cfg.model.path:
        raise ModelDirError("model.path is not set; pass model.path=/path/to/hf_checkpoint")
    base, error = None, None
    try:
        base = ModelDir(cfg.model.path)
    except Exception as e:  # noqa: BLE001 - every rank must reach the check below
        error = e
    if env is None or env.world_size <= 1 or not dist.is_initialized():
        if error is not None:
            raise error
        return base
    group = RankGroup()
    group.check(error)
    check_same_base(base, group, env)
    return base


def check_same_base(base: ModelDir, group: RankGroup, env: LaunchEnv) -> None:
    """Collective: every node holds the same base checkpoint at ``model.path``.

    Each rank reads the base from its own node. Node-local copies that differ (another revision, the instruct
    model beside the base one) would be mixed row by row into one sharded model, or train different bases
    under ddp, with no error. A node is a host name with the launcher's node rank (either tells nodes apart:
    a launch that miscounts its nodes is still checked); its first rank fingerprints its copy
    (:meth:`ModelDir.fingerprint`), and the fingerprints are compared. One node: one collective, no file read.

    Raises:
        ModelDirError: on every rank, naming the nodes whose copies differ.
    """
    nodes = group.all_gather((env.node_rank, socket.gethostname()))
    node = nodes[group.rank]
    if len(set(nodes)) <= 1:
        return
    mine = None
    if nodes.index(node) == group.rank:
        try:
            mine = base.fingerprint()
        except Exception as e:  # noqa: BLE001 - every rank must reach the gather
            mine = f"unreadable ({getattr(e, 'strerror', None) or e})"
    seen = sorted((n, sha) for n, sha in zip(nodes, group.all_gather(mine)) if sha is not None)
    kinds = list(dict.fromkeys(sha for _, sha in seen))  # node 0's copy first
    if len(kinds) > 1:
        def named(kind: str) -> str:
            same = [f"node {n} ({host})" for (n, host), sha in seen if sha == kind]
            more = f" and {len(same) - 3} more" if len(same) > 3 else ""
            what = f": {kind}" if kind.startswith("unreadable") else ""
            return ", ".join(same[:3]) + more + what

        raise ModelDirError(f"model.path={base.path} holds different checkpoints on different nodes "
                            f"({'; '.join(named(k) for k in kinds)}); give every node the same copy (or put it on "
                            "a filesystem all nodes share)")


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
    # parallel.reshard_after_forward=node planned as resolve_hybrid resolves it: the launch's ranks per node
    parallel, choice = choose_strategy(cfg, env.world_size, budget, ranks_per_node=env.local_world_size)
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
        from lora_dist.plan import choose_hybrid

        budget, aligned = _budget(cfg, env, device)
        if not aligned:
            why = "the nodes do not hold equal runs of consecutive ranks"
        else:
            p, why = choose_hybrid(cfg, env.world_size, env.local_world_size, budget)
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


def make_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ParallelConfig,
    train: TrainConfig,
    device: torch.device,
    ds_config: dict | None = None,
    base: ModelDir | None = None,
    base_dtype: torch.dtype | None = None,
) -> Engine:
    """The training-step engine for ``cfg.strategy`` (model already materialized and loaded from ``base``, its
    base kept in ``base_dtype``: ``model.dtype``)."""
    engine: Engine
    shard = cfg.shard_optimizer and dist.is_initialized() and dist.get_world_size() > 1
    if cfg.strategy == "fsdp2":
        engine = FSDP2Engine(model, optimizer, train.max_grad_norm, cfg.bucket_mb, device, shard)
    elif cfg.strategy == "ddp":
        engine = DDPEngine(model, optimizer, train.max_grad_norm, cfg.bucket_mb, device, shard)
    elif cfg.strategy.startswith("zero"):
        from lora_dist.parallel.deepspeed import DeepSpeedEngine  # DeepSpeed imported where it is used

        if ds_config is None:
            raise ValueError(f"parallel.strategy={cfg.strategy} needs its DeepSpeed config (deepspeed_config())")
        engine = DeepSpeedEngine(model, optimizer, ds_config, device)
    else:
        engine = Engine(model, optimizer, train.max_grad_norm, device)
    engine.base, engine.base_dtype = base, base_dtype
    tokens = train.micro_batch_size * train.seq_len
    why = engine.use_chunked_loss(train.loss_chunk, cfg.gather_head, tokens)
    if cfg.strategy == "fsdp2":
        engine.use_sharded_embedding(cfg.gather_embedding, tokens,
                                     torch.bfloat16 if cfg.mixed_precision == "bfloat16" else None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if why:
            log.info("the loss runs over the full logits (train.loss_chunk does not apply: %s)", why)
        elif isinstance(engine.head_loss, ShardedHeadLoss):
            log.info("the loss runs on the output head's vocabulary shards: the head is never gathered "
                     "(parallel.gather_head=false)")
        if engine.embedding is not None:
            log.info("the input embedding looks up on its vocabulary shards: it is never gathered "
                     "(parallel.gather_embedding=false)")
    return engine


def resolve_launch(cfg: Config, env: LaunchEnv, device: torch.device) -> Config:
    """``cfg`` as :func:`build` runs it on this launch: ``auto`` chosen (:func:`resolve_strategy`), then fsdp2's mesh
    (:func:`resolve_hybrid`). Resolving a resolved config changes nothing. Collective where either decides."""
    return resolve_hybrid(resolve_strategy(cfg, env, device), env, device)


def build(cfg: Config, env: LaunchEnv, device: torch.device, base: ModelDir,
          ds_config: dict | None, quantize_only: NF4Record | None = None) -> tuple[nn.Module, Engine]:
    """Resolve ``parallel.strategy=auto`` (:func:`resolve_strategy`) and fsdp2's mesh (:func:`resolve_hybrid`),
    load the model
    (:func:`~lora_dist.model.load_model`; ``quantize_only``: a run's NF4 weights, for its adapter on another
    sharding), make AdamW over its LoRA params and the engine.

    Every rank calls it, with inputs already checked (:func:`check_launch`, :func:`open_base`).
    """
    cfg = resolve_launch(cfg, env, device)  # auto is never zero*: ds_config stays None
    check_layer_drop(cfg.model, cfg.parallel.strategy, base.hf_config)
    t = cfg.train
    loaded = load_model(cfg.model, cfg.lora, cfg.parallel, device, t.seed, ds_config, base=base,
                        quantize_only=quantize_only)
    if env.is_main:
        log.info("%s", loaded.report)
        _warn_peft_misread(loaded.model)
        _note_base_dropout(loaded.model)
    model = loaded.model
    lora_params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    engine = make_engine(model, optimizer, cfg.parallel, t, device, ds_config, base=base,
                         base_dtype=parse_dtype(cfg.model.dtype))
    refuse_rewrap(model)  # the engine owns the wrapping and the gradient reduction
    return model, engine


def _note_base_dropout(model: nn.Module) -> None:
    """Say that the base model's own dropout trains along (GPT-2, StarCoder, Seed-OSS... ship it on), and how to
    turn it off."""
    sites = base_dropout(model)
    if sites:
        rates = ", ".join(f"{p:g}" for p in sorted(set(sites.values())))
        log.info("the base model's own dropout is on in training, as in PEFT and the Trainer (%d sites, p=%s: %s...); "
                 "its masks differ per rank, so ranks match one process only in distribution. model.base_dropout=false "
                 "turns it off", len(sites), rates, next(iter(sites)))


def _warn_peft_misread(model: nn.Module) -> None:
    """Say, before training, which adapted layers PEFT 0.21 and earlier would load wrongly
    (:func:`~lora_dist.adapter.peft_misread`), and the exclusion that keeps the adapter readable there: a warning
    where the PEFT installed here is such a release (or none is), a note where it reads them as trained."""
    misread = peft_misread(model)
    if misread:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in misread})
        log.log(logging.WARNING if installed_peft_misreads() else logging.INFO,
                "PEFT 0.21 and earlier would load %d of this adapter's layers wrongly (%s...): on this model type "
                "they take every %s target for the fused experts (PEFT 0.22 reads them as trained). lora-dist merge "
                "and export apply them as trained; for an adapter older PEFT reads as trained, add "
                "lora.exclude_modules=[%s]", len(misread), misread[0], "/".join(leaves), ",".join(leaves))


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
    base = open_base(cfg, env)
    from accelerate.utils import parse_flag_from_env

    if env.is_main and (parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or parse_flag_from_env("ACCELERATE_USE_FSDP")):
        log.warning("accelerate's config has a DeepSpeed/FSDP plugin, which takes a model without asking it first: "
                    "accelerator.prepare(model) would wrap lora_dist's model again (DeepSpeed) or shard it before "
                    "refusing (FSDP2); pass accelerator.prepare() only the dataloaders (docs/integrations.md)")
    return build(cfg, env, run_device(), base, strategy_config(cfg, base))


# ----------------------------------------------------------------------------- lora-dist export RUN_DIR


def _run_weights(run: Path) -> Path:
    """Where the run's newest LoRA weights are: its final adapter dir, or its latest checkpoint dir where that holds a
    later step (a longer run resumed from the finished one and stopped before its end), checked readable.

    Raises:
        ConfigError: neither is there, or ``latest`` names no checkpoint.
        ResumeError: the latest checkpoint is unreadable (one line naming it and the fix).
    """
    recover(run / "adapter", cleanup=False)  # a writer killed mid-publish may have left it aside
    adapter = run / "adapter" if (run / "adapter").is_dir() else None
    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        if adapter is None:
            raise ConfigError(f"{run} has neither adapter/ nor checkpoints/latest; is it a lora-dist output.dir?")
        return adapter
    name = latest.read_text().strip()
    if not STEP_DIR.fullmatch(name):
        raise ConfigError(f"{latest} names {name[:80]!r}, not a checkpoint (step-NNNNNN); the run dir is damaged")
    checkpoint = run / "checkpoints" / name
    adapter_at = adapter_step(adapter) if adapter is not None else None
    if adapter is not None and (adapter_at is None or not checkpoint.is_dir()):
        return adapter  # an adapter of a run before steps were recorded: the run's final weights, as then
    fix = (f"lora-dist export reads the run's latest checkpoint: resume the run (checkpoint.resume=auto goes back to "
           f"the previous good one) or point {latest} at an earlier step-NNNNNN")
    try:
        step = read_state(checkpoint)["step"]
        if adapter is not None and step <= adapter_at:  # the adapter holds the run's newest weights
            return adapter
        read_checkpoint(checkpoint)  # the one exported: every file readable, before any model is built
    except ResumeError as e:
        raise ResumeError(f"{e}; {fix}") from None
    if adapter is not None:
        log.warning("%s holds step %d, later than the run's adapter (step %d: a longer run resumed from it and stopped "
                    "before its end): exporting the checkpoint", checkpoint, step, adapter_at)
    return checkpoint


def _run_chat_template(run: Path, cfg: Config) -> str | None:
    """The template the run rendered its data with: its adapter's copy, else the one its config names (a run of an
    earlier lora_dist), or None with a warning where that is gone (moved, or relative to another working dir)."""
    template = adapter_chat_template(run / "adapter") if (run / "adapter").is_dir() else None
    if template is not None or not cfg.data.chat_template:
        return template
    try:
        return configured_template(cfg.data.chat_template)
    except ChatError as e:
        log.warning("the export carries the base's chat template, not the run's: %s", e)
        return None


def _run_lora_tensors(weights: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors in :func:`_run_weights`' dir, by ``model``'s names."""
    if weights.name == "adapter":
        return read_adapter(weights).model_tensors(model)
    return load_file(str(weights / "lora.safetensors"))


def _run_nf4_record(weights: Path) -> NF4Record | None:
    """The NF4 weights the run recorded beside its LoRA weights (:func:`_run_weights`); None where it recorded none
    (an older run: the export quantizes what its sharding can)."""
    return adapter_nf4_record(weights) if weights.name == "adapter" else nf4_record_of(read_state(weights))


def export_run(run_dir: str | Path, out: str | Path | None = None, dtype: str | None = None,
               max_shard_size: str | None = None, overwrite: bool = False, keep_fp8: bool | None = None) -> Path:
    """Write ``RUN_DIR/merged`` (or ``out``) from a finished run; call on every rank.

    Run it under the same launcher as training (``torchrun``, ``srun``,
    ``mpirun``): the base is rebuilt sharded across the ranks exactly as in
    training, the run's LoRA weights are loaded on every rank, and each rank
    merges the shards it owns (:func:`~lora_dist.export.export_merged`). As one process it
    streams base + adapter from disk (:func:`~lora_dist.export.merge_offline`),
    and never loads the base onto a GPU.

    Args:
        run_dir: a run's ``output.dir`` (holds ``config.json`` and ``adapter/``
            or ``checkpoints/``).
        out: the checkpoint dir to create; default ``RUN_DIR/merged``. Never the base, the run's
            ``adapter/``, ``checkpoints/`` or ``config.json``, nor a dir containing or inside one of them.
        dtype: dtype of the floating tensors written; default the run's ``export.dtype``.
        max_shard_size: largest file; default the run's ``export.max_shard_size``.
        overwrite: replace an existing output that is a merged checkpoint lora_dist wrote (also when the
            run's ``output.overwrite`` is set); anything else there is refused.
        keep_fp8: write a block-scaled FP8 base as it is stored (``export.keep_fp8``); default the run's.

    Returns:
        The checkpoint dir, as an absolute path.

    Raises:
        ConfigError: ``run_dir`` is not a lora-dist output dir, or its adapter does not fit its config.
        OutputExistsError, ExportError, MergeError: as for :func:`~lora_dist.export.export_merged`.
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"{run}/config.json not found; RUN_DIR must be a lora-dist output.dir")
    try:
        raw = json.loads((run / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{run}/config.json is not valid JSON ({e}); RUN_DIR must be a lora-dist output.dir") from None
    if isinstance(raw, dict) and "model_type" in raw:  # a transformers config: a model dir, not a run's
        raise ConfigError(f"{run} is a model checkpoint dir, not a lora-dist output.dir; export a run's dir, or merge "
                          "an adapter into this model with lora-dist merge --base DIR --adapter ADAPTER --out OUT")
    cfg = recorded_config(raw)
    env = init_distributed(cfg.parallel.timeout_s)
    out_dir = Path(out) if out else run / "merged"
    out_dtype = parse_dtype(dtype or cfg.export.dtype)
    shard_size = max_shard_size or cfg.export.max_shard_size
    overwrite = overwrite or cfg.output.overwrite
    keep_fp8 = cfg.export.keep_fp8 if keep_fp8 is None else keep_fp8
    inputs = [cfg.model.path, run / "adapter", run / "checkpoints", run / "config.json"]
    # Before any work (the model load below): an output the export may not write is refused on every rank.
    RankGroup().on_rank0(lambda: check_output(out_dir, inputs, overwrite=overwrite, base_dir=cfg.model.path,
                                              what="--out"))
    weights = _run_weights(run)  # before any model is built: a run dir with no LoRA weights is refused at once
    template = RankGroup().on_rank0(lambda: _run_chat_template(run, cfg))
    # An NF4 run (model.quantize) is exported from its quantized model on any number of ranks: the merge is
    # into the dequantized base it was trained on, not into the original weights merge_offline reads.
    if env.world_size == 1 and weights.name == "adapter" and not cfg.model.quantize:
        # One process: stream base + adapter tensor by tensor from disk; nothing is loaded whole.
        return merge_offline(cfg.model.path, run / "adapter", out_dir, max_shard_size=shard_size, dtype=out_dtype,
                             overwrite=overwrite, keep_fp8=keep_fp8, chat_template=template)
    parallel = cfg.parallel
    if env.world_size > 1 and parallel.strategy in ("none", "auto"):  # shard the base for the export
        parallel.strategy = "fsdp2"
    if env.world_size == 1:
        parallel.strategy = "none"
    parallel.dp_replicate = parallel.dp_shard = 0  # the export's own ranks: the base sharded over all of them
    parallel.reshard_after_forward = True
    # One process holds the whole base: host memory, never one GPU's.
    device = run_device() if env.world_size > 1 else torch.device("cpu")
    base = open_base(cfg, env)
    ds = strategy_config(cfg, base)
    # The weights the run stored as NF4 depend on its sharding: quantize those, whatever this export's ranks.
    only = _run_nf4_record(weights) if cfg.model.quantize else None
    model = load_model(cfg.model, cfg.lora, parallel, device, cfg.train.seed, ds, base=base, quantize_only=only).model
    tensors = _run_lora_tensors(weights, model)
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
    return export_merged(model, out_dir, base, dtype=out_dtype, max_shard_size=shard_size, overwrite=overwrite,
                         what="--out", lora=tensors, base_dtype=parse_dtype(cfg.model.dtype), keep_fp8=keep_fp8,
                         chat_template=template)
