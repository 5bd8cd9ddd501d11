"""``lora-dist eval CONFIG``: loss and perplexity of a run's adapter, or of the base, on the validation data.

It runs where training runs (one process, torchrun, srun, mpirun), sets the model up as
training does (:func:`lora_dist.session.build`: the base sharded the same way, LoRA
replicated), and reads the validation blocks ``data.eval_path`` or ``data.eval_fraction``
give. Every block is evaluated exactly once whatever the world size, so W ranks report
what one process reports. The adapter is a PEFT-format dir (default: the run's
``<output.dir>/adapter``); ``base_only`` measures the base model (LoRA's B is zero: the
base exactly). With ``model.quantize=nf4`` the weights the adapter's run stored as NF4 are
stored so here too, on any number of ranks (which ones depends on the run's sharding).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from lora_dist.config import Config
from lora_dist.data import DataError, load_splits, load_tokenizer
from lora_dist.launch import LaunchEnv, init_distributed, run_device

__all__ = ["EvalResult", "evaluate_run"]


@dataclass
class EvalResult:
    loss: float
    """Token-mean cross-entropy over every target token of the validation blocks."""
    perplexity: float
    tokens: int
    """Target tokens (tokens that carry a loss)."""
    blocks: int
    model: str
    """The adapter dir evaluated, or "base"."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_run(cfg: Config, adapter: str | os.PathLike | None = None, base_only: bool = False,
                 env: LaunchEnv | None = None) -> EvalResult:
    """Evaluate ``adapter`` (default ``<output.dir>/adapter``), or the base with ``base_only``; every rank calls it.

    Raises:
        DataError: no validation data (``data.eval_path`` unset and ``data.eval_fraction`` 0).
        AdapterError: no adapter where expected, or one that does not fit the base.
        ConfigError, ModelDirError, LaunchError: as training.
    """
    from lora_dist.adapter import AdapterError, adapter_nf4_record, read_adapter
    from lora_dist.lora import LoRAConfigError
    from lora_dist.model_dir import skeleton
    from lora_dist.session import build, check_launch, open_base, strategy_config
    from lora_dist.train import eval_sums

    env = env or init_distributed(cfg.parallel.timeout_s, allow_batch_shell=False)
    check_launch(cfg, env)
    base = open_base(cfg, env)
    files = None
    if not base_only:
        adapter = Path(adapter) if adapter is not None else Path(cfg.output.dir) / "adapter"
        if not adapter.is_dir():
            raise AdapterError(f"no adapter at {adapter}; pass --adapter DIR (a PEFT-format adapter), output.dir= of "
                               "a finished run, or --base-only to evaluate the base model")
        files = read_adapter(adapter)
        cfg = dataclasses.replace(cfg, lora=files.injection_config(skeleton(base)))
    tokenizer = load_tokenizer(cfg.model.path)
    hf_config = base.hf_config
    max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    _, eval_data = load_splits(cfg, tokenizer, max_pos, verbose=env.is_main)
    if eval_data is None or len(eval_data) == 0:
        raise DataError("no validation data: set data.eval_path=FILE, or data.eval_fraction above 0 to hold out a "
                        "share of data.path")
    # An NF4 run's adapter names the weights it trained on as NF4 (they depend on its sharding): those, whatever
    # this evaluation's ranks, so the loss is the one the run reported.
    only = adapter_nf4_record(adapter) if files is not None and cfg.model.quantize else None
    try:
        model, engine = build(cfg, env, run_device(), base, strategy_config(cfg, base), quantize_only=only)
    except LoRAConfigError as e:  # the adapter's own targets: they name no layer of this base
        if files is None:
            raise
        raise AdapterError(f"the adapter at {adapter} does not fit model.path={cfg.model.path} ({e}); it was trained "
                           "on a different base: set model.path to that base") from None
    if files is not None:
        engine.load_state_dict({"lora": files.model_tensors(model)}, step=0)
    loss_sum, tokens = eval_sums(engine, eval_data, cfg.train.micro_batch_size, None, env)
    if tokens == 0:
        raise DataError("the validation blocks hold no target tokens (every label is masked); check data.loss_on "
                        "and the record formats")
    loss = loss_sum / tokens
    return EvalResult(loss, math.exp(min(loss, 700.0)), int(tokens), len(eval_data),
                      str(adapter) if files is not None else "base")
