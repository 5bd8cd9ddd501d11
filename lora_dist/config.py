"""Typed run configuration: dataclasses -> YAML -> dotted CLI overrides.

Precedence is CLI > file > defaults. Unknown keys are an error that suggests
the closest valid key; a value of the wrong type is an error naming the key; a key
given twice in a file is an error. A text key keeps the text as written, also where
YAML 1.1 reads a number (``output.dir=0042``, ``tracking.run_name=1.10``). A path key's
leading ``~`` is the home dir, expanded once when the config is built (:func:`home`): YAML
does not expand it, nor does the shell after ``key=``.
Help text lives in attribute docstrings and is shown by ``lora-dist train --help``.
YAML is parsed safely and within limits on size, nesting and alias expansion
(:func:`lora_dist.inputs.parse_yaml`), and errors show only a short excerpt of a value.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from lora_dist.errors import ConfigError
from lora_dist.inputs import (MAX_CONFIG_BYTES, YAMLBool, clip, excerpt, parse_yaml, plain, read_json, read_text,
                              source_text)
from lora_dist.chat import LOSS_ON
from lora_dist.lora import LoRAConfig, LoRAConfigError
from lora_dist.packing import LONG_DOCUMENTS
from lora_dist.quant import QUANTIZE, quantize_problem

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ExportConfig",
    "ModelConfig",
    "OutputConfig",
    "FSDP2_ONLY",
    "ParallelConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_help",
    "config_to_dict",
    "fsdp2_only_defaults",
    "home",
    "load_config",
    "read_deepspeed_config",
    "recorded_config",
]

STRATEGIES = ("fsdp2", "zero3", "zero2", "zero1", "ddp", "none", "auto")
DTYPES = ("float32", "bfloat16", "float16")
#: Smallest valid value of each numeric key with a lower bound of ``>=`` (lora.r is checked by LoRAConfig).
MINIMUMS = {
    "parallel.replica_check_every": 0,
    "parallel.memory_gb": 0,
    "train.steps": 1,
    "train.micro_batch_size": 1,
    "train.grad_accum": 1,
    "train.weight_decay": 0,
    "train.warmup_steps": 0,
    "train.min_lr_ratio": 0,
    "train.max_grad_norm": 0,
    "train.seq_len": 1,
    "train.seed": 0,
    "train.eval_every": 0,
    "train.eval_batches": 1,
    "train.log_every": 1,
    "train.run_steps": 0,
    "train.loss_chunk": 0,
    "checkpoint.every": 0,
    "checkpoint.keep": 1,
}
#: Keys that must be strictly positive.
POSITIVE = ("parallel.bucket_mb", "parallel.timeout_s", "train.lr")
#: Largest valid value of each numeric key with an upper bound of ``<=``.
MAXIMUMS = {
    "train.min_lr_ratio": 1.0,  # the final LR is a fraction of the peak
    "train.lr": 1.0,  # AdamW moves each weight by about lr per step
    "parallel.timeout_s": 7 * 24 * 3600.0,  # a collective that waits a week is a hang
    "parallel.bucket_mb": 1 << 20,  # 1 TB
}
#: Every integer key stays below this: larger values are typos, and would overflow the seeds' arithmetic.
MAX_INT = 2**31 - 1


def home(path: Any, key: str) -> Any:
    """The value ``path`` of the path key ``key`` with a leading ``~`` (or ``~user``) expanded to that home dir;
    anything else unchanged.

    Every path key goes through it once, as its section is built: ``output.dir=~/runs/a`` (the shell leaves a
    ``~`` after ``=`` alone, as YAML does) would otherwise create a directory named ``~`` in the working dir.

    Raises:
        ConfigError: a ``~user`` whose user does not exist.
    """
    if not (isinstance(path, str) and path.startswith("~")):
        return path
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        user = path.split("/", 1)[0]
        raise ConfigError(f"{key}={excerpt(path, 120)} starts with {excerpt(user, 40)}, but no such user has a home "
                          "dir; write the full path (with ./ before it for a dir of that name in the working dir)")
    return expanded


def _home_sources(value: Any, key: str) -> Any:
    """A ``data.path``-style value (a path, or a list of paths and ``{path, weight}`` mappings) with each path
    through :func:`home`; a malformed value unchanged, for :func:`lora_dist.sources.parse_sources` to refuse."""
    if not isinstance(value, list):
        return home(value, key)
    return [{**item, "path": home(item["path"], key)} if isinstance(item, dict) and "path" in item
            else home(item, key) for item in value]


@dataclass
class ModelConfig:
    """The base model."""

    path: str = ""
    """Local Hugging Face checkpoint dir (config.json + *.safetensors + tokenizer)."""
    dtype: str = "float32"
    """Dtype the frozen base weights are kept in: float32 or bfloat16 (float16 is refused: it needs a loss
    scaler; a float16 checkpoint loads as either)."""
    quantize: str = ""
    """QLoRA: "nf4" stores the transformer blocks' linear weights as 4-bit NormalFloat (torchao; pip install
    'lora_dist[quant]'), each rank quantizing the rows it loads; "" keeps them in model.dtype. fsdp2, ddp and
    none only. The merged export merges into the dequantized base (docs/qlora.md)."""
    quantize_embeddings: bool = False
    """With model.quantize: the input embedding and the output head stored as NF4 too (a row lookup of the NF4
    data; the loss dequantizes this rank's head rows). Off, as in QLoRA: they stay in model.dtype. Their share
    of the base is large where the vocabulary is (Llama-3 8B: 2 GB of 16 GB in bf16); see docs/qlora.md for the
    loss it costs."""
    base_dropout: bool = True
    """Keep the base model's own dropout (config.json's attention_dropout, resid_pdrop, hidden_dropout...) in
    training, as PEFT and the Trainer do; false sets it to 0. Its masks are drawn per rank, so with it on, W
    ranks match one process only in distribution, not step for step. LayerDrop (layerdrop > 0) counts as the base's
    dropout: under fsdp2 and zero3 it must be off (refused otherwise)."""

    def __post_init__(self) -> None:
        self.path = home(self.path, "model.path")
        if self.quantize not in QUANTIZE:
            raise ConfigError(quantize_problem(self.quantize, "none"))
        if self.quantize_embeddings and not self.quantize:
            raise ConfigError("model.quantize_embeddings=true needs model.quantize=nf4 (it quantizes the embedding "
                              "and head along with the blocks); set both, or drop model.quantize_embeddings")


class _DefaultFraction(float):
    """``data.eval_fraction``'s default, told apart from a value the user set (see ``DataConfig``)."""


@dataclass
class DataConfig:
    """Training data."""

    path: str | list[str | dict[str, Any]] = ""
    """A .jsonl file of records, each {"messages": [{"role", "content"}, ...]} (loss on the assistant turns),
    {"instruction", "input", "output"} (alpaca, loss on the output), {"prompt", "completion"} (loss on the
    completion) or {"text"}; a .parquet file or a datasets save_to_disk dir of such records; a .txt file (one
    record per paragraph); or a list of sources [{path: ..., weight: 2}, ...], each record of a source used
    weight times per pass over the data (a fraction: a fixed seeded share of its records). See docs/data.md."""
    eval_path: str | list[str | dict[str, Any]] = ""
    """Validation data, as data.path; when set, its blocks are the held-out ones (data.eval_fraction unused)."""
    eval_fraction: float = _DefaultFraction(0.05)
    """Share of each data.path source's records held out for the eval loss, the last ones, chosen before the
    weights apply and packed apart: never trained on (0 with data.eval_path)."""
    packing: bool = True
    """Pack several documents into each train.seq_len block (positions restart and attention stops at each
    document); false: one document per sequence, padded."""
    chat_template: str = ""
    """Chat template for "messages" and alpaca records: "" (the tokenizer's own), a shipped one (chatml, llama3)
    or a Jinja file; set it for a base model without a template."""
    loss_on: str = "all_assistant"
    """Which assistant turns of a conversation carry the loss: all_assistant or last_assistant."""
    long_documents: str = "auto"
    """A document longer than train.seq_len: split (consecutive blocks, each learned: text reads on), truncate
    (its first train.seq_len tokens: a conversation or a completion is never learned without its prompt), drop
    (left out), or auto: split text, truncate a document with a prompt (as TRL truncates)."""
    cache_dir: str = ""
    """Where tokenized, packed blocks are cached and memory-mapped by every rank and restart: "" ($LORA_DIST_CACHE,
    else ~/.cache/lora_dist/tokens). A dir shared by the nodes is built once; otherwise once per node."""
    num_proc: int = 0
    """Tokenization worker processes when the cache is built (0: the CPUs, at most 8)."""

    def __post_init__(self) -> None:
        from lora_dist.sources import SourceSpecError, parse_sources

        self.path = _home_sources(self.path, "data.path")
        self.eval_path = _home_sources(self.eval_path, "data.eval_path")
        self.chat_template = home(self.chat_template, "data.chat_template")
        self.cache_dir = home(self.cache_dir, "data.cache_dir")
        for key, allowed in (("loss_on", LOSS_ON), ("long_documents", LONG_DOCUMENTS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"data.{key}={excerpt(getattr(self, key), 40)} is not one of {', '.join(allowed)}")
        for key in ("path", "eval_path"):
            try:
                parse_sources(getattr(self, key), f"data.{key}")
            except SourceSpecError as e:
                raise ConfigError(str(e)) from None
        if self.num_proc < 0:
            raise ConfigError(f"data.num_proc must be >= 0 (0: the CPUs, at most 8), got {self.num_proc}")
        if self.eval_path:
            if isinstance(self.eval_fraction, _DefaultFraction):
                self.eval_fraction = 0.0
            elif self.eval_fraction:
                raise ConfigError(f"data.eval_path and data.eval_fraction={self.eval_fraction:g} both choose the "
                                  "held-out data; set one (data.eval_fraction=0 with data.eval_path)")
        self.eval_fraction = float(self.eval_fraction)  # a plain float from here on (YAML, JSON)


@dataclass
class ParallelConfig:
    """How the model is spread over ranks."""

    strategy: str = "fsdp2"
    """fsdp2 (default; over one shard rank, e.g. one GPU, it runs as none/ddp unless parallel.cpu_offload or the bf16
    cast needs FSDP2), zero3, zero2, zero1, ddp, none (single process), or auto: the fastest that the planner
    predicts fits parallel.memory_gb per rank (ddp without selective recompute, else ddp, else fsdp2, else fsdp2
    with activation checkpointing of every 4th block, every 2nd, every block, else that with
    parallel.shard_unit=weight and parallel.offload_activations)."""
    memory_gb: float = 0.0
    """parallel.strategy=auto: memory per rank in GB (1e9 bytes); 0: the GPU's free memory less 10% of its total
    (fragmentation, NCCL buffers), or on the CPU the host's memory (or its cgroup's limit, a Slurm job's --mem,
    where lower) divided by the ranks on the node."""
    mixed_precision: str = "float32"
    """Compute dtype of the base under fsdp2/zero: float32 or bfloat16 (LoRA params and grad reduction stay fp32).
    float16 is refused: it needs a loss scaler, which lora_dist does not run."""
    activation_checkpointing: bool | int = False
    """Recompute transformer blocks' activations in backward: true (every block), false, or N: every Nth block only
    (blocks 0, N, 2N, ...; Hugging Face's every_n_layers), the others keeping theirs - part of the memory saved for
    part of the recompute (lora_dist.parallel.checkpointing)."""
    selective_recompute: bool = True
    """Recompute the cheap elementwise work of the frozen base in backward instead of keeping its activations:
    every RMSNorm (in a 16-bit model autograd keeps an fp32 copy of its input) and the gated MLP's
    act_fn(gate) * up (lora_dist.parallel.checkpointing). No matmul is recomputed; results are bitwise the same.
    false: keep what autograd keeps."""
    compile: bool = False
    """Compile each transformer block with torch.compile (in place: names, checkpoints and export unchanged): the
    elementwise work between the matmuls fused into fewer kernels, fewer kernel launches on a GPU. The compiler
    then recomputes cheap work itself, so parallel.selective_recompute does not apply to the blocks. The first
    step pays the compile (seconds to tens of seconds). Not with zero3, model.quantize, or parallel.offload_activations
    under activation checkpointing (lora_dist.parallel.compile)."""
    reshard_after_forward: bool | int | str = True
    """fsdp2: free the gathered base weights after forward (re-gather in backward); false: keep them; node (or an
    integer N): keep a 1/N shard after forward, N = the ranks of a node, so backward gathers within the node
    only (more memory than true, less inter-node traffic; FSDP2's reshard_after_forward=int)."""
    cpu_offload: bool = False
    """fsdp2: keep base shards in CPU memory between uses (refused with ddp, none and zero*)."""
    shard_unit: str = "block"
    """fsdp2: what one all-gather brings in: block (a transformer block, the default: the fewest collectives) or
    weight (each weight matrix of a block its own unit: the peak holds one block and one weight gathered instead
    of three blocks; more, smaller all-gathers for the same bytes - the frozen base has no gradients to
    reduce-scatter, so that is all they cost)."""
    offload_activations: bool = False
    """With activation checkpointing: each block's checkpointed input waits for backward in host memory (pinned on
    a GPU) instead of device memory; one device-to-host and one host-to-device copy per block and step."""
    gather_head: bool = False
    """fsdp2: all-gather the output head for the loss (as for any unit). false (default): the head is never
    gathered; the ranks gather their final hidden states instead and each computes the loss over its own
    vocabulary rows (train.loss_chunk applies; an untied Linear head, lora_dist.loss.ShardedHeadLoss) - where
    that holds less: a vocabulary larger than the shard group's tokens per micro-batch."""
    gather_embedding: bool = False
    """fsdp2: all-gather the input embedding at each forward's start (as for any unit). false (default): it is
    never gathered; the ranks gather their token ids, each looks them up in its own vocabulary rows and a
    reduce-scatter gives each rank its tokens' rows (bit for bit the gathered lookup; an untied nn.Embedding,
    lora_dist.parallel.embedding) - where that holds less, as for parallel.gather_head."""
    bucket_mb: float = 25.0
    """Size of the LoRA gradient all-reduce buckets (MB); under zero1/2/3 DeepSpeed's reduce bucket,
    capped at the size of all LoRA gradients (a bigger bucket only holds memory)."""
    shard_optimizer: bool = True
    """fsdp2/ddp on several ranks: each rank keeps and steps 1/W of the LoRA AdamW state (LoRA gradients
    reduce-scattered, the update all-gathered: the bytes of an all-reduce); false: every rank holds all of it.
    zero1/2/3 partition it their own way."""
    replica_check_every: int = 0
    """Every N optimizer steps assert LoRA params are bit-identical across ranks (0: off)."""
    deepspeed_config: str = ""
    """zero*: path to a DeepSpeed JSON config to use instead of the generated one (its zero_optimization.stage,
    if given, must be the strategy's; the batch and clipping keys are set from train.*; its bf16 and fp16 "enabled"
    from model.dtype and parallel.mixed_precision where it leaves them out or writes "auto", a file that
    contradicts them refused)."""
    timeout_s: float = 600.0
    """Collective / rendezvous timeout in seconds."""
    dp_replicate: int = 0
    """fsdp2: replica groups (hybrid sharding, HSDP; named as in torchtitan and accelerate): the base is sharded
    over parallel.dp_shard ranks within a group and replicated across groups; dp_replicate x dp_shard = the
    ranks. 0 (auto): one group per node when several nodes run and the model fits in one node's ranks (the
    planner, parallel.memory_gb), so only LoRA gradients cross nodes; else 1 (the base sharded over all ranks)."""
    dp_shard: int = 0
    """fsdp2: ranks per replica group, over which the base is sharded (0: the ranks / parallel.dp_replicate)."""

    def __post_init__(self) -> None:
        self.deepspeed_config = home(self.deepspeed_config, "parallel.deepspeed_config")
        rho = self.reshard_after_forward
        if isinstance(rho, str) and rho != "node":
            raise ConfigError(f"parallel.reshard_after_forward must be true, false, node or a rank count, got "
                              f"{excerpt(rho, 40)}")
        if not isinstance(rho, (bool, str)) and rho < 1:
            raise ConfigError(f"parallel.reshard_after_forward={rho}: a rank count must be >= 1")
        if self.shard_unit not in ("block", "weight"):
            raise ConfigError(f"parallel.shard_unit must be block or weight, got {excerpt(self.shard_unit, 40)}")
        ac = self.activation_checkpointing
        if not isinstance(ac, bool):
            if ac < 0:
                raise ConfigError(f"parallel.activation_checkpointing must be true, false or N >= 2 (every Nth "
                                  f"block), got {ac}")
            self.activation_checkpointing = ac if ac > 1 else bool(ac)  # 1: every block, 0: none
        if self.offload_activations and not self.activation_checkpointing and self.strategy != "auto":
            raise ConfigError("parallel.offload_activations moves the checkpointed block inputs to host memory; "
                              "set parallel.activation_checkpointing=true with it")
        for key in ("dp_replicate", "dp_shard"):
            if getattr(self, key) < 0:
                raise ConfigError(f"parallel.{key} must be >= 0 (0: auto), got {getattr(self, key)}")

    def check_strategy(self) -> None:
        """The fsdp2-only keys are refused with another explicit strategy (``auto`` may still pick ddp: then
        they do not apply)."""
        rho = self.reshard_after_forward
        if (self.dp_replicate > 1 or self.dp_shard > 0 or rho is not True) and self.strategy not in ("fsdp2", "auto"):
            what = (f"parallel.reshard_after_forward={str(rho).lower()}" if rho is not True else
                    f"parallel.dp_replicate={self.dp_replicate}, parallel.dp_shard={self.dp_shard}")
            raise ConfigError(f"{what} applies to parallel.strategy=fsdp2 only, not {self.strategy}")
        if self.shard_unit != "block" and self.strategy not in ("fsdp2", "auto"):
            raise ConfigError(f"parallel.shard_unit={self.shard_unit} applies to parallel.strategy=fsdp2 only, "
                              f"not {self.strategy}")
        if self.cpu_offload and self.strategy not in ("fsdp2", "auto"):
            raise ConfigError(f"parallel.cpu_offload=true applies to parallel.strategy=fsdp2 only (its base shards in "
                              f"host memory), not {self.strategy}; set parallel.strategy=fsdp2 or drop "
                              "parallel.cpu_offload")

    def why_not_compiled(self, quantize: str = "") -> str | None:
        """Why ``parallel.compile`` cannot apply with these settings and ``model.quantize`` (None when it can);
        :mod:`lora_dist.parallel.compile` says why each one is refused."""
        if self.strategy == "zero3":
            return ("zero3 gathers each weight in hooks inside the blocks, which the compiler cannot trace; use "
                    "parallel.strategy=fsdp2 (the same sharding) or parallel.compile=false")
        if quantize:
            return (f"an {quantize} base is dequantized weight by weight outside the compiler's reach; set "
                    "parallel.compile=false")
        if self.offload_activations and self.activation_checkpointing:
            return ("parallel.offload_activations wraps each block's checkpoint in hooks the compiler cannot enter "
                    "(the blocks would run eagerly); drop one of the two")
        return None


@dataclass
class TrainConfig:
    """The optimization loop."""

    steps: int = 50
    """Optimizer steps."""
    micro_batch_size: int = 2
    """Sequences per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    max_grad_norm: float = 1.0
    """Clip the LoRA gradients' global norm (0: no clipping)."""
    seq_len: int = 128
    """Tokens per packed training sequence."""
    loss_chunk: int = 1024
    """Tokens per chunk of the output head + loss, each chunk's gradient computed as it goes (under fsdp2's
    vocabulary shards recomputed in backward): the full fp32 logits never exist
    (0: the plain loss over the full logits). Under fsdp2 (parallel.gather_head=false) a chunk holds that many
    of all shard-group ranks' tokens over this rank's vocabulary rows. Off where the head is LoRA-adapted or
    soft-caps its logits."""
    seed: int = 0
    """Seed for LoRA init, dropout and data order."""
    eval_every: int = 0
    """Eval loss every N steps (0: only at the end)."""
    eval_batches: int = 4
    """Global batches of held-out blocks per eval (eval_batches x the global batch size, spread over the held-out
    set: the same blocks at every eval, and for the same global batch whatever the world size; lora-dist eval takes
    every block)."""
    log_every: int = 1
    """Write metrics every N steps."""
    run_steps: int = 0
    """Stop this invocation after N steps with a checkpoint, to be resumed later (0: run to train.steps)."""


@dataclass
class CheckpointConfig:
    """Resumable training state (LoRA weights, optimizer, schedule, RNG, data position)."""

    every: int = 0
    """Checkpoint every N steps (0: only on preemption)."""
    keep: int = 2
    """How many recent checkpoints of this run to keep."""
    resume: str = "auto"
    """auto (this run's latest checkpoint in output.dir, if any), never (a fresh start, refused if output.dir holds
    checkpoints; a restart of the job goes on from those it saved), or a checkpoint dir."""
    force: bool = False
    """Resume even if the checkpoint was made against a different base model, on other data blocks or with another
    train.seed (a warning then)."""

    def __post_init__(self) -> None:
        self.resume = home(self.resume, "checkpoint.resume")

    def check_spelling(self) -> None:
        """A ``resume`` close to auto or never that names no path is refused, naming the one meant (the user's
        input: a run's recorded config is read back whatever its dir holds now)."""
        close = difflib.get_close_matches(self.resume, ["auto", "never"], n=1, cutoff=0.6)
        if self.resume not in ("auto", "never") and close and "/" not in self.resume and \
                not os.path.lexists(self.resume):
            raise ConfigError(f"checkpoint.resume={self.resume!r} is neither auto, never nor a checkpoint dir; did "
                              f"you mean {close[0]}?")


@dataclass
class ExportConfig:
    """What is written at the end of training."""

    adapter: bool = True
    """Save the PEFT-format adapter to <output.dir>/adapter."""
    merged: bool = False
    """Write a merged HF checkpoint to <output.dir>/merged, from the sharded state."""
    dtype: str = "bfloat16"
    """Merged checkpoint dtype: bfloat16, float16 or float32 (the merge itself is fp32)."""
    max_shard_size: str = "5GB"
    """Largest safetensors file of the merged checkpoint (decimal units: 500MB, 5GB; or KiB, MiB, GiB)."""
    keep_fp8: bool = True
    """A base stored as block-scaled FP8 (DeepSeek-V3, the Qwen3 -FP8 releases) is written as it is stored: its
    tensors copied byte for byte, each adapted weight merged in fp32 and quantized again with new block scales,
    quantization_config kept (about half the bytes of bf16). false: every weight dense in export.dtype."""


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "runs/latest"
    """Run directory: metrics.jsonl, checkpoints/, adapter/, merged/. A leading ~ is the home dir, here and in
    every path key (model.path, data.path...), also after = where the shell leaves it."""
    overwrite: bool = False
    """Allow replacing an existing merged export (one lora_dist wrote), and a fresh start from step 0 over a
    finished run's adapter/ (docs/safety.md)."""

    def __post_init__(self) -> None:
        self.dir = home(self.dir, "output.dir")


@dataclass
class TrackingConfig:
    """Experiment tracking, on rank 0: the scalars of metrics.jsonl and the run config (see lora_dist/tracking.py)."""

    tensorboard: bool = True
    """TensorBoard event files in <output.dir>/tensorboard/."""
    mlflow: str = ""
    """MLflow: a tracking URI (http://..., databricks, sqlite:///...) or a local dir (MLflow's file store); "" off."""
    wandb: str = ""
    """W&B: offline (files in <output.dir>/wandb; `wandb sync` uploads them later), online, or "" off."""
    project: str = "lora_dist"
    """MLflow experiment / W&B project."""
    run_name: str = ""
    """Run name in MLflow and W&B (default: output.dir's name)."""

    def __post_init__(self) -> None:
        self.mlflow = home(self.mlflow, "tracking.mlflow")  # a local dir; a URI has no leading ~
        if self.wandb not in ("", "offline", "online"):
            raise ConfigError(f"tracking.wandb={excerpt(self.wandb, 40)} is not one of offline, online (or \"\" off)")


@dataclass
class Config:
    """A lora_dist run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "Config":
        """Cross-field checks; raises :class:`ConfigError`."""
        p = self.parallel
        if p.strategy not in STRATEGIES:
            raise ConfigError(f"parallel.strategy={p.strategy!r} is not one of {STRATEGIES}")
        p.check_strategy()
        for key, value in (("model.dtype", self.model.dtype), ("parallel.mixed_precision", p.mixed_precision),
                           ("export.dtype", self.export.dtype)):
            if value not in DTYPES:
                raise ConfigError(f"{key}={value!r} is not one of {DTYPES}")
        for key, value in (("model.dtype", self.model.dtype), ("parallel.mixed_precision", p.mixed_precision)):
            if value == "float16":
                raise ConfigError(f"{key}=float16 would train in float16, which needs a loss scaler lora_dist does not "
                                  "run; use bfloat16 (the same memory, no overflow) or float32")
        for key, minimum in MINIMUMS.items():
            if self._get(key) < minimum:
                raise ConfigError(f"{key} must be >= {minimum}, got {self._get(key)}")
        for key in POSITIVE:
            if self._get(key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {self._get(key)}")
        for key, maximum in MAXIMUMS.items():
            if self._get(key) > maximum:
                raise ConfigError(f"{key} must be <= {maximum}, got {self._get(key)}")
        for key in config_keys():
            value = self._get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT:
                raise ConfigError(f"{key} must be <= {MAX_INT}, got {excerpt(value, 40)}")
        problem = quantize_problem(self.model.quantize, p.strategy)
        if problem:
            raise ConfigError(problem)
        if p.compile:
            problem = p.why_not_compiled(self.model.quantize)
            if problem:
                raise ConfigError(f"parallel.compile=true does not apply: {problem}")
        if p.deepspeed_config:
            if not p.strategy.startswith("zero"):
                raise ConfigError(f"parallel.deepspeed_config is a DeepSpeed config, used by the zero strategies only, "
                                  f"not parallel.strategy={p.strategy}; set parallel.strategy=zero1, zero2 or zero3, "
                                  "or drop parallel.deepspeed_config")
            # the file itself is read when a run starts (session.check_launch): a finished run's config, exported
            # later, stays loadable after it moved
        self._check_shard_size()
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")
        t = self.train
        if t.lr * t.weight_decay >= 1:
            raise ConfigError(f"train.lr * train.weight_decay must be < 1 (AdamW scales each weight by "
                              f"1 - lr*weight_decay per step), got {t.lr} * {t.weight_decay}")
        return self

    def _get(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def _check_shard_size(self) -> None:
        from lora_dist.export.layout import parse_size

        size = self.export.max_shard_size
        try:
            parse_size(size)
        except (ValueError, OverflowError):
            raise ConfigError(f"export.max_shard_size={excerpt(size, 40)} is not a positive size; write it like "
                              "export.max_shard_size=5GB (or 500MB, 200KB, 2GiB)") from None


def read_deepspeed_config(path: str, strategy: str) -> dict[str, Any]:
    """The DeepSpeed config in the JSON file ``path`` (``parallel.deepspeed_config``) for ``strategy`` (zero1-3).

    Raises:
        ConfigError: the file is missing or unreadable, not a JSON object, or its ``zero_optimization.stage``
            is not ``strategy``'s.
    """
    key = f"parallel.deepspeed_config={excerpt(path, 120)}"
    if not Path(path).is_file():
        raise ConfigError(f"{key}: no such file; give the path of a DeepSpeed JSON config, or drop "
                          "parallel.deepspeed_config to use the generated one")
    ds = read_json(path, ConfigError, "the DeepSpeed config (parallel.deepspeed_config)")
    if not isinstance(ds, dict):
        raise ConfigError(f"{key}: the file holds {excerpt(ds, 40)}, not a JSON object; a DeepSpeed config is "
                          '{"zero_optimization": {...}, ...}')
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{key}: zero_optimization is {excerpt(zero, 40)}, not an object; write it as "
                          '"zero_optimization": {"stage": N, ...}')
    stage, wanted = zero.get("stage"), int(strategy[-1])
    if stage is not None and str(stage) != str(wanted):
        other = f" or parallel.strategy=zero{stage}" if str(stage) in ("1", "2", "3") else ""
        raise ConfigError(f"{key}: zero_optimization.stage is {excerpt(stage, 40)} but parallel.strategy={strategy} "
                          f"is stage {wanted}; make them agree (\"stage\": {wanted} in the file{other})")
    return ds


_SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after an annotated field)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_keys() -> list[str]:
    """Every ``section.key`` a config has, in order."""
    return [f"{s}.{f.name}" for s, sf in _SECTIONS.items() for f in dataclasses.fields(sf.default_factory)]


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5) if len(key) <= 100 else []
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys start with {sorted(_SECTIONS)}"
    return ConfigError(f"unknown config key {excerpt(key)}{hint}")


def _type_hints(cls: type) -> dict[str, Any]:
    import lora_dist.lora as lora_mod

    return typing.get_type_hints(cls, globalns=vars(lora_mod) | globals())


#: A type as an error message names the values it takes.
_SPELLED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
            list[str]: "a list of strings"}


def _shown(value: Any) -> str:
    """A config value as the user wrote it in YAML: true, false and null as such, anything else as a short excerpt."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = source_text(value)
    return excerpt(value) if text is None else clip(text)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None) or (arg is str and not isinstance(value, str)):
                continue  # a number is a string only where a string is the one choice (model.path=123)
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        choices = " or ".join(_SPELLED.get(arg) or _type_name(arg) for arg in args)
        raise ConfigError(f"{key} must be {choices}, got {_shown(value)}")
    if hint is Any:
        return plain(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, YAMLBool):
            return value.value
        raise ConfigError(f"{key} must be {_SPELLED[bool]}, got {_shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{key} must be {_SPELLED[int]}, got {_shown(value)}")
    if hint is float:
        # A string too: YAML 1.1 reads "3e-4" (no dot) as a string.
        if isinstance(value, (int, float, str)) and not isinstance(value, (bool, YAMLBool)):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                pass
            else:
                if math.isfinite(number):
                    return number
                raise ConfigError(f"{key} must be a finite number, got {_shown(value)}")
        raise ConfigError(f"{key} must be {_SPELLED[float]}, got {_shown(value)}")
    if hint is str:
        text = source_text(value)  # YAML 1.1 reads 0042 as 34, 1.10 as 1.1, yes as true: keep what was written
        if text is not None:
            return text
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be {_SPELLED[str]}, got {_shown(value)}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        raise ConfigError(f"{key} must be a list, got {_shown(value)}")
    if origin is dict:
        if isinstance(value, dict):
            return plain(value)
        raise ConfigError(f"{key} must be a mapping, got {_shown(value)}")
    return value


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = _SECTIONS[name].default_factory
    hints = _type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(f"{name}.{key}", config_keys())
        try:
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        except ConfigError as e:
            doc = _attribute_docs(cls).get(key, "")
            first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", doc)[0].rstrip(".")  # "e.g." ends no sentence
            raise ConfigError(f"{e}; {name}.{key}: {clip(first, 200)}" if doc else str(e)) from None
    try:
        return cls(**kwargs)
    except LoRAConfigError as e:
        raise ConfigError(str(e)) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if not isinstance(item, str):
        raise ConfigError(f"override {excerpt(item)} must be a section.key=value string")
    if "=" not in item:
        raise ConfigError(f"override {excerpt(item)} must look like section.key=value (e.g. lora.r=16)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        name = key.rsplit(".", 1)[-1]
        matches = [k for k in config_keys() if k.endswith(f".{name}")]
        hint = f"did you mean {' or '.join(map(repr, matches))}?" if matches else "e.g. train.lr=3e-4"
        raise ConfigError(f"override key {excerpt(key)} must be section.key; {hint}")
    try:
        value = parse_yaml(raw, ConfigError, f"override {excerpt(key)}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from defaults, a YAML file and dotted overrides.

    Args:
        path: YAML file with top-level sections (``lora:``, ``train:`` ...), or None.
        overrides: ``section.key=value`` strings; values are parsed as YAML
            (``lora.target_modules=[q_proj,v_proj]``, ``export.merged=true``).

    Raises:
        ConfigError: missing/invalid file, a file or value over the limits on what a
            config may cost (size, nesting, alias expansion), unknown key (with the
            closest valid one), wrong type (naming the key), or invalid values.
    """
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        text = read_text(path, ConfigError, "the config file", max_bytes=MAX_CONFIG_BYTES)
        try:
            loaded = parse_yaml(text, ConfigError, str(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({clip(str(e).splitlines()[0], 300)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, lora:, ...)")
        for section, values in loaded.items():
            if section not in _SECTIONS:
                raise _unknown(str(section), sorted(_SECTIONS))
            if values is None:  # a section with every key commented out
                values = {}
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            raw[section] = dict(values)
    for item in overrides:
        key, value = _parse_override(item)
        section, name = key.split(".")
        if section not in _SECTIONS:
            raise _unknown(key, config_keys())
        raw.setdefault(section, {})[name] = value
    sections = {name: _build_section(name, raw.get(name, {})) for name in _SECTIONS}
    sections["checkpoint"].check_spelling()
    return Config(**sections).validate()


def config_from_dict(raw: dict[str, dict[str, Any]], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A :class:`Config` from a nested dict (e.g. a run's saved ``config.json``) plus overrides.

    Raises:
        ConfigError: ``raw`` is not a mapping of sections to mappings, or as :func:`load_config`.
    """
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"a run config must be a mapping of sections to mappings, got {excerpt(raw)}")
    merged = {k: dict(v) for k, v in raw.items()}
    for item in overrides:
        key, value = _parse_override(item)
        section, name = key.split(".")
        merged.setdefault(section, {})[name] = value
    for section in merged:
        if section not in _SECTIONS:
            raise _unknown(str(section), sorted(_SECTIONS))
    sections = {name: _build_section(name, merged.get(name, {})) for name in _SECTIONS}
    return Config(**sections).validate()


#: The ``parallel.*`` keys of fsdp2 alone: refused with another explicit strategy (``check_strategy``).
FSDP2_ONLY = ("dp_replicate", "dp_shard", "reshard_after_forward", "shard_unit", "cpu_offload")


def fsdp2_only_defaults() -> dict[str, Any]:
    """:data:`FSDP2_ONLY`'s keys at their defaults: what a run under another strategy records."""
    defaults = {f.name: f.default for f in dataclasses.fields(ParallelConfig)}
    return {key: defaults[key] for key in FSDP2_ONLY}


def recorded_config(raw: dict[str, dict[str, Any]]) -> Config:
    """A run's recorded ``config.json`` (:func:`config_from_dict`), the fsdp2-only keys dropped where an earlier
    lora_dist recorded them beside another strategy, which left them unapplied (``auto`` choosing ddp, or
    ``cpu_offload`` under zero*, accepted then): such a run dir stays exportable.

    Raises:
        ConfigError: as :func:`config_from_dict`.
    """
    parallel = raw.get("parallel") if isinstance(raw, dict) else None
    if isinstance(parallel, dict) and parallel.get("strategy", "fsdp2") not in ("fsdp2", "auto"):
        raw = {**raw, "parallel": {k: v for k, v in parallel.items() if k not in FSDP2_ONLY}}
    return config_from_dict(raw)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe)."""
    return dataclasses.asdict(cfg)


def config_help() -> str:
    """Every key with its type, default and help text."""
    lines = []
    for section, sf in _SECTIONS.items():
        cls = sf.default_factory
        lines.append(f"{section}:  {(cls.__doc__ or '').strip().splitlines()[0]}")
        docs, hints, default = _attribute_docs(cls), _type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            lines.append(f"  {section}.{f.name} ({_type_name(hints[f.name])}, default {value!r})")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)
