"""Per-rank memory of a lora_dist run, predicted before anything is launched.

    lora-dist plan CONFIG.yaml --world-size W [section.key=value ...]

The model is built as a skeleton on the meta device from the checkpoint's
``config.json`` (no weights are read; a dir with only ``config.json`` is
enough), LoRA is injected into it exactly as training does, and every term is
computed from the resulting parameter shapes and the run config:

* **base shard**: the frozen base weights a rank holds. fsdp2 keeps
  ``ceil(rows / W)`` rows of every weight (FSDP2 pads dim 0 to a multiple of
  W); zero3 keeps ``ceil(numel / W)`` elements of every parameter, plus a
  whole copy of every parameter below DeepSpeed's persistence threshold
  (shown as *replicated*); ddp/none/zero1/zero2 keep everything.
  DeepSpeed with its ``bf16`` section enabled (``parallel.mixed_precision=bfloat16`` or a bf16 base:
  :func:`~lora_dist.parallel.deepspeed.deepspeed_config`) holds the whole module in bf16, so under
  zero1/2/3 the base and the activations count 2 bytes an element even over an fp32 ``model.dtype``;
  fsdp2 keeps its shards in ``model.dtype`` and casts what it gathers.
  With ``model.quantize=nf4`` the weights :mod:`lora_dist.quant` quantizes at
  this sharding count torchao's NF4 bytes of their shard
  (:func:`~lora_dist.nf4.nf4_bytes`: half a byte per element, an int8 scale
  per 64, a float per 16,384, 17 floats per tensor); the others as above.
* **LoRA params**, **grads**, **optimizer state**: fp32 A/B on every rank,
  their gradients, AdamW's two moments (under ZeRO partitioned over ranks,
  with an fp32 master partition: zero1/2 with DeepSpeed's bf16 hold the LoRA
  params, their gradients and the reduce bucket in bf16, zero2 only its
  gradient partition; zero3 keeps the LoRA fp32, its partition the master, and
  a gradient partition in the model's dtype, each full gradient waiting in the
  reduce bucket, plus the flat fp32 copy a reduction makes of it).
  fsdp2/ddp with ``parallel.shard_optimizer``
  on W > 1 ranks (:class:`~lora_dist.parallel.sharded_adamw.ShardedAdamW`):
  the params are views of flat buckets padded to a multiple of W, backward
  moves the gradients into flat bucket copies of the same size (freed as each
  bucket's reduce-scatter completes: at most four buckets' worth of gradients
  at once with ``train.grad_accum=1``), and each
  rank keeps ``ceil(bucket / W)`` elements per bucket of the fp32 master and
  the two moments, plus a gradient buffer of that size (*buffers*).
* **activations**: what autograd saves for backward, counted with
  ``saved_tensors_hooks`` on Llama-family blocks (SDPA attention, SwiGLU MLP).
  Per token and transformer block, in activation elements: ``5 H + 2 H_kv +
  4 I + sum(r)`` (H hidden, I MLP width, H_kv key/value width, sum(r) over the
  block's LoRA layers: the norms' outputs, q, the attention output in SDPA's
  layout and in o_proj's, k, v, the MLP's gate, act(gate), up and product),
  plus the two RMSNorms' fp32 inputs (``2 H`` fp32: in a 16-bit model a copy)
  and SDPA's fp32 log-sum-exp per head. With ``parallel.selective_recompute``
  (:mod:`lora_dist.parallel.checkpointing`) the norms keep their input as it
  is (``2 H`` elements) and the MLP only gate and up (``2 I``). With activation
  checkpointing, each checkpointed block's input plus one block recomputed (of every
  Nth block: those blocks' inputs, the others' activations as above); with ``parallel.offload_activations`` the block
  inputs wait in host memory instead, shown apart (:attr:`MemoryPlan.offloaded`, not in the peak). The plain loss adds three ``tokens x vocab`` fp32
  buffers (logits, the fp32 copy, log-softmax; their gradients reuse the
  same sizes as backward frees them). The chunked loss (``train.loss_chunk``,
  where :func:`lora_dist.loss.chunkable` allows it) holds the final hidden
  states and their gradient, plus one chunk's logits in fp32 (turned into
  the softmax in place), and in a 16-bit compute dtype the gradient cast to
  it; with the head left sharded (fsdp2), a chunk's logits cover 1/W of the
  vocabulary (an NF4 head's: one block of its rows) and every rank's hidden
  states are gathered.
* **gathered**: unsharded base weights alive at the peak. fsdp2 with
  ``reshard_after_forward``: what is left in the root unit (final norm), the
  output head (its own unit when untied, kept gathered from its forward to its
  backward; never gathered when the loss runs on its vocabulary shards) and
  three transformer blocks (the running one, the next one, and the flat
  all-gather output FSDP2 copies a block's params out of); without it,
  everything. With ``parallel.shard_unit=weight`` (every weight matrix of a
  block its own unit) the same three are weights, not blocks; a checkpointed
  block's recompute, though, gathers all of its weights and keeps them
  (FSDP2 does not reshard in backward's recompute): one block plus the
  all-gather output of its largest weight.
  Resharded to N ranks after forward (``reshard_after_forward=N`` or ``node``),
  every block and the input embedding also keep a 1/N shard from their
  forward until backward. ``node`` is the ranks of a node: ``lora-dist plan
  --ranks-per-node`` (default :func:`default_ranks_per_node`: W up to 8, else
  the largest count dividing W and 8), at launch the launch's ranks per node, as
  training resolves it; the plan says which it assumed.
  zero3: a parameter backward uses again within ``stage3_max_reuse_distance``
  parameters is not released after forward, so with a reuse distance beyond
  the model's size the whole base stays gathered (at most
  ``stage3_max_live_parameters``); otherwise the largest weight (the module
  running) plus the prefetch bucket.
  With an NF4 base, the gathered blocks are NF4 bytes (FSDP2 all-gathers the
  NF4 shards), plus one weight dequantized in the compute dtype for its matmul
  (the largest; also under ddp/none). An NF4 head is dequantized for the
  chunked loss 2048 vocabulary rows at a time (``lora_dist.loss.HEAD_BLOCK_ROWS``).
* **buffers**: communication buckets: the LoRA gradient bucket (fsdp2), DDP's
  bucket copies, DeepSpeed's reduce bucket (at most the size of the LoRA
  gradients: lora_dist caps it there).
* **adapted experts**: an adapter on fused experts (``lora.target_parameters``)
  runs the experts with ``W + delta``, a new tensor the size of the whole fused
  param (in the compute dtype) that the expert matmuls keep for backward, as
  PEFT's ``ParamWrapper`` does: every block's adapted expert params, or one
  block's for all the checkpointed blocks.

Mixture-of-experts models are counted as they are built: the fused expert
params (``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) are
sharded like any base param; :attr:`MemoryPlan.num_expert_params` are theirs,
:attr:`MemoryPlan.num_active_params` the base params one token uses (the
non-expert ones plus ``top_k / E`` of the experts), and
:attr:`MemoryPlan.num_expert_lora_params` the LoRA params on the experts. The
activation estimate uses ``top_k`` experts' width per token.

The peak is the largest of the moments of a step (:data:`MOMENTS`), each summed:
**the loss** (every saved activation and the loss's buffers; of the base only the
root's rest and the head, as gathered; no gradients yet), **backward's start**
(the last block's backward: the blocks gathered as above, the saved activations,
the block recomputed under checkpointing, the final hidden states' gradient, the
LoRA gradients) and, under fsdp2 with an untied embedding, **forward's start** (the
root's rest, the embedding gathered - or, where it looks up on its vocabulary shards,
every rank's tokens' rows for the reduce-scatter - and the first block gathered, the
embedding's output, no gradients). Gradients accumulated over micro-steps count at every moment. The
terms shown are the peak's (:attr:`MemoryPlan.peak_at`); :attr:`MemoryPlan.moments`
has every moment's total. Not
included: the process itself (Python, torch, libraries; about 0.4 GB of RSS
per CPU rank) and allocator caching.

``parallel.strategy=auto`` (:func:`choose_strategy`) plans the candidates in
order of speed and takes the first whose peak fits the memory per rank: ddp
(none on one rank), then fsdp2, then fsdp2 with activation checkpointing of every
4th block, of every 2nd, of every block, then that with one unit per weight and
offloaded activations.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_dist.config import Config, ParallelConfig
from lora_dist.dtypes import parse_dtype
from lora_dist.errors import ConfigError
from lora_dist.model_dir import text_config

__all__ = ["MemoryPlan", "StrategyChoice", "choose_strategy", "default_ranks_per_node", "memory_budget", "meta_model",
           "plan_memory"]

LORA_BYTES = 4  # LoRA params, grads and optimizer state are fp32
PARTIAL_CHECKPOINTING = (4, 2)
"""``parallel.strategy=auto``'s checkpointing of every Nth block, tried in this order before every block."""
GB = 1e9
#: The moments of a step that may hold the most, and what each holds.
MOMENTS = {
    "the loss": "every saved activation and the loss's buffers, no block gathered",
    "backward's start": "the last block's backward gathering its weights, the loss done",
    "the first recompute": "the last checkpointed block recomputed, the blocks after it (not checkpointed) done",
    "forward's start": "the input embedding's lookup and the first block gathered; later moments hold less",
}


@dataclass
class StrategyChoice:
    """What ``parallel.strategy=auto`` chose (:func:`choose_strategy`) and why."""

    strategy: str
    activation_checkpointing: bool | int
    budget: int
    """Memory per rank in bytes (``parallel.memory_gb``, or the device's)."""
    peaks: list[tuple[str, int]] = field(default_factory=list)
    """``(candidate, predicted peak in bytes)`` of each candidate planned, in order of preference."""

    def summary(self) -> str:
        tried = ", ".join(f"{name} {peak / GB:.2f} GB ({'fits' if peak <= self.budget else 'too big'})"
                          for name, peak in self.peaks)
        chosen = self.peaks[-1][0] if self.peaks else self.strategy
        return (f"parallel.strategy=auto chose {chosen}: the fastest whose predicted peak per rank fits "
                f"the budget of {self.budget / GB:.2f} GB (parallel.memory_gb); {tried}")


@dataclass
class MemoryPlan:
    """Predicted bytes per rank; :attr:`total` is the training peak."""

    strategy: str
    world_size: int
    tokens_per_micro_batch: int
    activation_checkpointing: bool | int
    mode: str
    """The strategy with the memory modes it is planned with (:func:`mode_name`)."""
    num_params: int
    num_lora_params: int
    num_expert_params: int
    num_active_params: int
    num_expert_lora_params: int
    model_bytes: int
    largest_tensor_bytes: int
    base_shard: int
    base_replicated: int
    lora_params: int
    lora_grads: int
    optimizer_state: int
    activations: int
    gathered: int
    buffers: int
    adapted_experts: int
    choice: StrategyChoice | None = None
    """Where the config asked for ``parallel.strategy=auto``: what was chosen, and why."""
    dp_replicate: int = 1
    """fsdp2 replica groups (hybrid sharding: the base is sharded over ``world_size / dp_replicate`` ranks)."""
    peak_at: str = "backward's start"
    """The moment of the step the terms describe, the one that holds the most (:data:`MOMENTS`)."""
    offloaded: int = 0
    """``parallel.offload_activations``: the checkpointed block inputs waiting in host memory (not in the peak)."""
    moments: dict[str, int] = field(default_factory=dict)
    """What each moment of :data:`MOMENTS` planned holds in all (the peak is the largest)."""
    runs_as: str = ""
    """Where the config's strategy runs as another (fsdp2 over one shard rank: none or ddp), which and why."""
    ranks_per_node: int | None = None
    """fsdp2 with ``parallel.reshard_after_forward=node``: the ranks of a node it was planned with (else None)."""
    node_reshard: str = ""
    """fsdp2 with ``parallel.reshard_after_forward=node``: the node size assumed and what it keeps after forward."""
    hybrid: str = ""
    """fsdp2 on several nodes with ``dp_replicate`` and ``dp_shard`` unset: the split chosen, as training chooses it
    (:func:`choose_hybrid`), and why."""

    TERMS = ("base_shard", "base_replicated", "lora_params", "lora_grads", "optimizer_state", "activations",
             "gathered", "buffers", "adapted_experts")

    @property
    def total(self) -> int:
        return sum(getattr(self, t) for t in self.TERMS)

    @property
    def export_budget(self) -> int:
        """What a merged export may hold per rank: its share of the model plus the largest tensor."""
        return math.ceil(self.model_bytes / self.world_size) + self.largest_tensor_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "export_budget": self.export_budget}

    def table(self) -> str:
        labels = {
            "base_shard": "base shard (frozen)", "base_replicated": "base, replicated (persistent)",
            "lora_params": "LoRA params", "lora_grads": "LoRA grads", "optimizer_state": "optimizer state",
            "activations": "activations + loss", "gathered": "gathered base (transient)",
            "buffers": "communication buffers", "adapted_experts": "adapted experts (W + delta)",
        }
        lines = [self.choice.summary(), ""] if self.choice else []
        lines += [
            f"strategy={self.mode} world_size={self.world_size}"
            f"{f' (dp_replicate={self.dp_replicate} x dp_shard={self.world_size // self.dp_replicate})' if self.dp_replicate > 1 else ''}"
            f" tokens/micro-batch/rank={self.tokens_per_micro_batch}",
            *([self.hybrid] if self.hybrid else []),
            *([self.runs_as] if self.runs_as else []),
            *([self.node_reshard] if self.node_reshard else []),
            f"model: {self.num_params / 1e6:.1f}M params ({self.model_bytes / GB:.2f} GB), LoRA "
            f"{self.num_lora_params / 1e6:.2f}M params, largest tensor {self.largest_tensor_bytes / GB:.3f} GB",
        ]
        if self.num_expert_params:
            lines.append(f"experts: {self.num_expert_params / 1e6:.1f}M params, {self.num_active_params / 1e6:.1f}M "
                         f"active per token, expert LoRA {self.num_expert_lora_params / 1e6:.2f}M params")
        lines += ["", f"{'per rank':32s} {'GB':>8s}"]
        for term in self.TERMS:
            lines.append(f"  {labels[term]:30s} {getattr(self, term) / GB:8.3f}")
        lines.append(f"  {'peak (sum)':30s} {self.total / GB:8.3f}")
        lines.append(f"  (at {self.peak_at}: {MOMENTS[self.peak_at]})")
        others = [f"{moment} {total / GB:.3f}" for moment, total in self.moments.items() if moment != self.peak_at]
        if others:
            lines.append(f"  (other moments: {', '.join(others)})")
        if self.offloaded:
            lines.append(f"  {'host: checkpointed inputs':30s} {self.offloaded / GB:8.3f}  (not in the peak)")
        lines.append("")
        lines.append(f"merged export budget per rank (model/W + largest tensor): {self.export_budget / GB:.3f} GB")
        lines.append("not included: the process itself (Python/torch/libraries, ~0.4 GB RSS per CPU rank)")
        return "\n".join(lines)


def _hf_config(model_path: str):
    import transformers as tf

    from lora_dist.model_dir import ModelDirError

    if not model_path:
        raise ModelDirError("model.path is not set; pass model.path=/path/to/hf_checkpoint (config.json is enough)")
    if not (Path(model_path) / "config.json").is_file():
        raise ModelDirError(f"{model_path} has no config.json; model.path must be a Hugging Face checkpoint dir")
    return tf.AutoConfig.from_pretrained(model_path, trust_remote_code=False)  # never code from a model dir


def meta_model(cfg: Config, hf_config) -> torch.nn.Module:
    """The skeleton training builds, on the meta device, with LoRA injected."""
    from lora_dist.lora import inject_lora
    from lora_dist.model_dir import model_class

    with torch.device("meta"):
        model = model_class(hf_config).from_config(hf_config, dtype=parse_dtype(cfg.model.dtype))
    inject_lora(model, cfg.lora)
    return model


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _fsdp_shard_numel(shape: tuple[int, ...], world: int) -> int:
    if not shape:
        return 1
    return math.ceil(shape[0] / world) * _numel(shape[1:])


def _experts(hf_config) -> tuple[int, int]:
    """``(E, top_k)`` of a mixture-of-experts config, ``(0, 0)`` for a dense one."""
    experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 0
    return experts, (getattr(hf_config, "num_experts_per_tok", None) or 0) if experts else 0


def _expert_params(model: torch.nn.Module, lora: set[int]) -> list[tuple[str, torch.nn.Parameter]]:
    """The fused expert params: 3-D base params of an ``experts`` module (E, ..., ...)."""
    return [(n, q) for n, q in model.named_parameters() if id(q) not in lora and q.dim() == 3 and ".experts." in n]


def _block_activation_bytes(hf_config, lora_ranks_per_block: int, elt: int, selective: bool,
                            product_kept: bool = False) -> int:
    """Bytes saved for backward per token by one Llama-family transformer block (MoE: top_k experts' width), with
    activations of ``elt`` bytes; ``selective``: parallel.selective_recompute (``product_kept``: under someone else's
    saved-tensor hooks, checkpointing, the gated product is kept all the same)."""
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd")
    heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_head")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden
    experts, top_k = _experts(hf_config)
    if experts:
        # The routed experts (not recomputed), per token: for each of its top_k experts the gate_up output and its
        # activation, and the expert's output, kept for the product with the routing weight (transformers'
        # grouped_mm experts: frozen weights keep no input); the router's fp32 probabilities, the routing
        # indices and weights.
        moe_inter = getattr(hf_config, "moe_intermediate_size", None) or inter
        mlp = top_k * (3 * moe_inter + hidden) * elt + experts * 4 + top_k * 36
    else:  # gate, act(gate), up, their product; recomputed: gate and up
        mlp = (2 + product_kept if selective else 4) * inter * elt
    # Two norms: their input in fp32 (an fp32 copy in a 16-bit model), or recomputed: the input as it is; the
    # norms' outputs, q, the attention output (in two layouts: SDPA's and o_proj's input), k, v, the LoRA
    # hiddens; SDPA's fp32 log-sum-exp per head.
    norms = 2 * hidden * (elt if selective else 4)
    return norms + (5 * hidden + 2 * kv_heads * head_dim + lora_ranks_per_block) * elt + mlp + heads * 4


def _fsdp2_side_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The non-block FSDP2 units :func:`lora_dist.parallel.parallelize` makes (embedding, head)."""
    from lora_dist.parallel.parallelize import embedding_and_head

    return [m for m in embedding_and_head(model) if m is not None]


def _deepspeed(cfg: Config, hf_config, lora_numel: int) -> tuple[dict, bool]:
    """The ``zero_optimization`` section DeepSpeed gets (the run's config, as the engine caps it), and whether its
    ``bf16`` (or ``fp16``) section is enabled: then DeepSpeed holds the whole module, the frozen base included, in
    16 bits, whatever ``model.dtype`` (``parallel.mixed_precision=bfloat16`` over an fp32 base: a bf16 base)."""
    from lora_dist.parallel.deepspeed import cap_reduce_bucket, deepspeed_config

    ds = cap_reduce_bucket(deepspeed_config(cfg, hf_config), lora_numel)
    bf16 = ds["bf16"] if "bf16" in ds else ds.get("bfloat16")  # DeepSpeed reads bf16 first, then the older name
    half = any((section or {}).get("enabled") is True for section in (bf16, ds.get("fp16")))
    return ds.get("zero_optimization", {}), half


def plan_memory(cfg: Config, world_size: int, budget: int | None = None,
                ranks_per_node: int | None = None) -> MemoryPlan:
    """Predict per-rank memory of training ``cfg`` on ``world_size`` ranks, from config.json alone.

    Args:
        cfg: the run config (``model.path``, ``lora``, ``parallel``, ``train``).
        world_size: number of ranks.
        budget: memory per rank in bytes, for ``parallel.strategy=auto`` and for fsdp2's split over several nodes
            (default: :func:`memory_budget` of this machine, a node's ranks on it).
        ranks_per_node: the ranks a node runs, what ``parallel.reshard_after_forward=node`` keeps a shard over
            (a launch's ``local_world_size``; < 1: not known, the blocks reshard fully, as training does then);
            default :func:`default_ranks_per_node`. Given, and fewer than ``world_size``: fsdp2 with
            ``dp_replicate`` and ``dp_shard`` unset is split as training splits it on such nodes
            (:func:`choose_hybrid`).

    Raises:
        ModelDirError: ``model.path`` has no config.json.
        LoRAConfigError: the LoRA targets match nothing in the model.
        ConfigError: ``world_size`` < 1; ``strategy=auto`` and no candidate fits the budget;
            ``reshard_after_forward=node`` and ``ranks_per_node`` does not divide the ranks the base is sharded over.
    """
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    node = default_ranks_per_node(world_size) if ranks_per_node is None else ranks_per_node
    hf_config = _hf_config(cfg.model.path)
    model = meta_model(cfg, hf_config)

    def per_rank() -> int:  # training's budget: this host's memory shared by a node's ranks, not by all of them
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return memory_budget(cfg.parallel.memory_gb, device, node if node >= 1 else world_size)

    choice = None
    if cfg.parallel.strategy == "auto":
        budget = per_rank() if budget is None else budget
        parallel, choice = _choose(cfg, world_size, budget, hf_config, model, node)
        cfg = dataclasses.replace(cfg, parallel=parallel)
    hybrid = ""
    # as training decides it on several nodes (session.resolve_hybrid); only where the node size is given, not the
    # default's guess (one node of 16 GPUs splits nothing)
    if ranks_per_node is not None and _hybrid_open(cfg.parallel, world_size, node):
        parallel, why = choose_hybrid(cfg, world_size, node, per_rank() if budget is None else budget)
        cfg = dataclasses.replace(cfg, parallel=parallel)
        hybrid = (f"hybrid sharding, as training chooses it on {world_size // node} nodes of {node} ranks: "
                  f"dp_replicate={parallel.dp_replicate} x dp_shard={parallel.dp_shard}, {why}"
                  if parallel.dp_replicate > 1 else f"the base sharded over all {world_size} ranks, as training "
                  f"chooses it on {world_size // node} nodes of {node} ranks: {why}")
    return dataclasses.replace(_plan(cfg, world_size, hf_config, model, node), choice=choice, hybrid=hybrid)


def _hybrid_open(p: ParallelConfig, world_size: int, ranks_per_node: int) -> bool:
    """Whether fsdp2's split is left to the launch: ``dp_replicate`` and ``dp_shard`` unset on several equal nodes."""
    return (p.strategy == "fsdp2" and not p.dp_replicate and not p.dp_shard and 1 <= ranks_per_node < world_size
            and world_size % ranks_per_node == 0)


def choose_hybrid(cfg: Config, world_size: int, ranks_per_node: int, budget: int) -> tuple[ParallelConfig, str]:
    """fsdp2 with ``dp_replicate`` and ``dp_shard`` unset on several nodes of ``ranks_per_node`` ranks: one replica
    group per node (hybrid sharding, so only LoRA gradients cross nodes) where the model planned over one node's
    ranks fits ``budget`` bytes per rank, else the base sharded over all ``world_size`` ranks. Returns
    ``cfg.parallel`` with the split chosen (or as given), and why."""
    p = cfg.parallel
    single = dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp_replicate=1, dp_shard=0))
    try:
        peak = plan_memory(single, ranks_per_node, ranks_per_node=ranks_per_node).total
    except Exception as e:  # noqa: BLE001 - a model the planner cannot size: the safe choice, said
        return p, f"the planner could not size the model ({type(e).__name__}: {e})"
    fits = peak <= budget
    why = (f"the model {'fits' if fits else 'does not fit'} in one node's {ranks_per_node} ranks (predicted peak "
           f"{peak / GB:.2f} GB per rank, budget {budget / GB:.2f} GB, parallel.memory_gb)")
    if fits:
        p = dataclasses.replace(p, dp_replicate=world_size // ranks_per_node, dp_shard=ranks_per_node)
    return p, why


#: The ranks of a node :func:`plan_memory` assumes where none is given: a node of 8 GPUs, the common size.
RANKS_PER_NODE = 8


def default_ranks_per_node(world_size: int) -> int:
    """The ranks per node ``lora-dist plan`` assumes without ``--ranks-per-node``: all ``world_size`` ranks up to
    :data:`RANKS_PER_NODE` (one node), else the largest count dividing both (equal nodes of at most that many)."""
    return world_size if world_size <= RANKS_PER_NODE else math.gcd(world_size, RANKS_PER_NODE)


#: The share of a GPU's memory the planner leaves to what it does not count: the caching allocator's fragmentation
#: and NCCL's buffers, which live outside it (more with every communicator: HSDP, node-size reshard meshes).
GPU_RESERVE = 0.10


def memory_budget(memory_gb: float, device: torch.device, local_ranks: int) -> int:
    """Memory per rank in bytes: ``memory_gb`` when set (> 0), else on CUDA the GPU's free memory now (after the
    CUDA context and the process group are up, and less what other processes hold) less :data:`GPU_RESERVE` of its
    total, or on the CPU the memory this process may use (:func:`host_memory`) divided by the ``local_ranks`` on
    this node."""
    if memory_gb > 0:
        return int(memory_gb * GB)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(int(free - GPU_RESERVE * total), 0)
    return host_memory() // max(local_ranks, 1)


def host_memory(root: str | os.PathLike = "/") -> int:
    """The memory this process may use: the host's, or less where its cgroup or one above caps it (a Slurm job's
    ``--mem``, a container's limit), cgroup v2 or v1. ``root``: where ``/proc`` and ``/sys`` are (tests)."""
    root = Path(root)
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return limits[0]
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
        except ValueError:
            continue
        if controllers == "":  # v2: one hierarchy
            mount, name = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            mount, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        where = Path(path)
        for group in [where, *where.parents]:  # the tightest limit on the way up
            try:
                value = (mount / str(group).lstrip("/") / name).read_text().strip()
            except OSError:
                continue
            if value.isdigit():
                limits.append(int(value))
    return min(limits)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def mode_name(p: ParallelConfig) -> str:
    """``p.strategy`` with the memory modes in effect: "fsdp2 + activation checkpointing + one unit per weight +
    offloaded activations" (what auto logs for its candidates and ``lora-dist plan`` heads its table with)."""
    name = p.strategy
    if p.activation_checkpointing:
        name += " + activation checkpointing"
        if p.activation_checkpointing is not True:
            name += f" of every {_ordinal(p.activation_checkpointing)} block"
    elif not p.selective_recompute and not p.compile:
        name += " without selective recompute"
    if p.strategy == "fsdp2" and p.shard_unit == "weight":
        name += " + one unit per weight"
    if p.offload_activations and p.activation_checkpointing:
        name += " + offloaded activations"
    if p.compile:
        name += " + compiled blocks"
    return name


def _at_least(every: bool | int, asked: bool | int) -> bool:
    """Whether checkpointing ``every`` recomputes at least the blocks ``asked`` does (auto never recomputes fewer)."""
    return not asked or every is True or (asked is not True and every <= asked)


def _candidates(p: ParallelConfig, world_size: int, base_dtype: str) -> list[tuple[str, ParallelConfig]]:
    """``parallel.strategy=auto``'s candidates, fastest first: ddp (1.7x-1.8x an fsdp2 step here when the base
    fits; not where ``parallel.mixed_precision=bfloat16`` casts a base of another dtype, which ddp would compute in
    fp32), first without selective recompute (its recomputed norms and MLP products cost ~3% of a step; where the
    whole base fits on every rank, the activations they save rarely matter); then fsdp2 with more and more blocks
    checkpointed (never fewer than ``p`` asks for); the last one holds the least: one FSDP2 unit per weight and the
    checkpointed block inputs in host memory."""
    from lora_dist.parallel.parallelize import as_replicated, replicated_if_unsharded

    # ddp and none compute in the base's dtype: parallel.mixed_precision=bfloat16 over another base is fsdp2's cast
    casts = p.mixed_precision == "bfloat16" and base_dtype != "bfloat16"
    offload = p.offload_activations and not p.compile
    # parallel.offload_activations without checkpointing (accepted under auto) applies to the checkpointed candidates.
    plain = p if p.activation_checkpointing else dataclasses.replace(p, offload_activations=False)
    # The replicated candidates drop the fsdp2-only keys (as_replicated): the run's config.json records the choice
    # and is read back by lora-dist export, which refuses them for ddp/none.
    options = [*(() if casts else (as_replicated(dataclasses.replace(plain, selective_recompute=False), world_size),
                                   as_replicated(plain, world_size))),
               dataclasses.replace(plain, strategy="fsdp2"),
               # Checkpointing every 4th block, every 2nd, every one: part of the activations for part of the
               # recompute. Compiled blocks cannot take the offload's hooks (lora_dist.parallel.compile).
               *(dataclasses.replace(p, strategy="fsdp2", activation_checkpointing=n, offload_activations=offload)
                 for n in (*PARTIAL_CHECKPOINTING, True) if _at_least(n, p.activation_checkpointing)),
               dataclasses.replace(p, strategy="fsdp2", activation_checkpointing=True, shard_unit="weight",
                                   offload_activations=not p.compile)]
    out: list[tuple[str, ParallelConfig]] = []
    for option in (replicated_if_unsharded(o, world_size, base_dtype) for o in options):
        name = mode_name(option)
        if name not in dict(out):
            out.append((name, option))
    return out


def _choose(cfg: Config, world_size: int, budget: int, hf_config, model: torch.nn.Module,
            ranks_per_node: int) -> tuple[ParallelConfig, StrategyChoice]:
    peaks: list[tuple[str, int]] = []
    for name, parallel in _candidates(cfg.parallel, world_size, cfg.model.dtype):
        peak = _plan(dataclasses.replace(cfg, parallel=parallel), world_size, hf_config, model, ranks_per_node).total
        peaks.append((name, peak))
        if peak <= budget:
            return parallel, StrategyChoice(parallel.strategy, parallel.activation_checkpointing, budget, peaks)
    name, smallest = min(peaks, key=lambda item: item[1])
    fixes = ["more ranks"] + (["model.dtype=bfloat16"] if cfg.model.dtype == "float32" else [])
    fixes += ["a smaller train.seq_len or train.micro_batch_size"]
    raise ConfigError(f"parallel.strategy=auto: nothing fits {budget / GB:.2f} GB per rank (parallel.memory_gb); "
                      f"the smallest predicted peak is {smallest / GB:.2f} GB ({name}); use {', '.join(fixes)}")


def choose_strategy(cfg: Config, world_size: int, budget: int,
                    ranks_per_node: int | None = None) -> tuple[ParallelConfig, StrategyChoice]:
    """Resolve ``parallel.strategy=auto``: the fastest candidate whose predicted peak fits ``budget`` bytes, with
    ``parallel.reshard_after_forward=node`` planned over ``ranks_per_node`` (:func:`plan_memory`; a launch passes
    its ``local_world_size``).

    Returns:
        ``(parallel, choice)``: ``cfg.parallel`` with the chosen strategy (and activation checkpointing), and why.

    Raises:
        ConfigError: no candidate fits, naming the smallest predicted peak and the fixes.
    """
    node = default_ranks_per_node(world_size) if ranks_per_node is None else ranks_per_node
    hf_config = _hf_config(cfg.model.path)
    return _choose(cfg, world_size, budget, hf_config, meta_model(cfg, hf_config), node)


@dataclass
class _Run:
    """What every term of a plan reads: the strategy as it runs, the model's parameters and blocks, the sizes."""

    cfg: Config
    p: ParallelConfig  # what runs (fsdp2 over one shard rank runs as ddp/none)
    world: int
    hf_config: Any
    model: torch.nn.Module
    base_elt: int  # bytes of a base element at rest (model.dtype; under DeepSpeed's bf16, 2)
    compute_elt: int  # bytes of a gathered weight and of an activation
    zero: dict  # zero*: DeepSpeed's zero_optimization section (else empty)
    lora: set[int]  # ids of the LoRA params
    base: list[tuple[str, torch.nn.Parameter]]
    lora_numel: int
    base_numel: int
    blocks: list[torch.nn.Module]
    checkpointed: list[int]  # the blocks backward recomputes
    shards: int  # ranks a base weight's rows are split over (fsdp2's dp_shard; else 1)
    ranks_per_node: int  # what parallel.reshard_after_forward=node means (< 1: not known, as true)
    nf4: set[int]  # ids of the weights stored as NF4
    tokens: int  # per micro-batch
    hidden: int  # the hidden size
    chunk: int  # tokens per chunk of the chunked loss; 0: the plain loss over the full logits
    embed: torch.nn.Module | None  # the input embedding and output head as their own FSDP2 units
    head: torch.nn.Module | None
    head_sharded: bool  # fsdp2: the loss runs on the head's vocabulary shards, the head never gathered
    embed_sharded: bool  # fsdp2: the embedding looks up on its vocabulary shards, never gathered

    @classmethod
    def of(cls, cfg: Config, world_size: int, hf_config, model: torch.nn.Module, ranks_per_node: int) -> _Run:
        from lora_dist.blocks import find_blocks
        from lora_dist.lora import lora_parameters
        from lora_dist.loss import chunkable
        from lora_dist.nf4 import nf4_quantizable
        from lora_dist.parallel import dp_mesh_shape
        from lora_dist.parallel.checkpointing import checkpointed_blocks
        from lora_dist.parallel.embedding import plain_lookup
        from lora_dist.parallel.parallelize import embedding_and_head, replicated_if_unsharded
        from lora_dist.quant import quantized_weights
        from lora_dist.sharding import vocab_sharding_pays

        p: ParallelConfig = replicated_if_unsharded(cfg.parallel, world_size, cfg.model.dtype)
        full_config = hf_config
        hf_config = text_config(hf_config)  # a vision-language model: its language model's
        base_elt = parse_dtype(cfg.model.dtype).itemsize
        # fsdp2 casts the gathered base (parallel.mixed_precision=bfloat16) and keeps its shards in model.dtype;
        # DeepSpeed with bf16 enabled holds the whole module in bf16, its partitions too.
        compute_elt = 2 if (p.mixed_precision == "bfloat16" and p.strategy == "fsdp2") else base_elt
        lora_params = lora_parameters(model)
        lora = {id(q) for q in lora_params}
        lora_numel = sum(q.numel() for q in lora_params)
        zero: dict = {}
        if p.strategy.startswith("zero"):
            zero, half = _deepspeed(cfg, full_config, lora_numel)
            if half:
                base_elt = compute_elt = 2
        base = [(n, q) for n, q in model.named_parameters() if id(q) not in lora]
        blocks = find_blocks(model)
        # model.quantize=nf4: the weights lora_dist.quant quantizes at this sharding are NF4 bytes at rest and
        # gathered (FSDP2 all-gathers the NF4 shards); one of them is dequantized at a time for its matmul.
        # fsdp2 shards the base over dp_shard ranks (all W, or one replica group's under hybrid sharding).
        shards = dp_mesh_shape(p, world_size)[1] if p.strategy == "fsdp2" else 1
        nf4 = {id(m._parameters[a]) for m, a in quantized_weights(model, cfg.model.quantize_embeddings)
               if nf4_quantizable(tuple(m._parameters[a].shape), shards)} if cfg.model.quantize else set()
        embed, head = embedding_and_head(model)
        tokens = cfg.train.micro_batch_size * cfg.train.seq_len
        chunk = min(cfg.train.loss_chunk, tokens) if chunkable(model) is None else 0
        return cls(
            cfg=cfg, p=p, world=world_size, hf_config=hf_config, model=model, base_elt=base_elt,
            compute_elt=compute_elt, zero=zero, lora=lora, base=base, lora_numel=lora_numel,
            base_numel=sum(q.numel() for _, q in base), blocks=blocks,
            checkpointed=checkpointed_blocks(len(blocks), p.activation_checkpointing), shards=shards,
            ranks_per_node=ranks_per_node, nf4=nf4,
            tokens=tokens, hidden=getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd"), chunk=chunk,
            embed=embed, head=head,
            head_sharded=(p.strategy == "fsdp2" and not p.gather_head and bool(chunk) and head is not None
                          and vocab_sharding_pays(head.weight.shape[0], shards, tokens)),
            embed_sharded=(p.strategy == "fsdp2" and not p.gather_embedding and plain_lookup(embed)
                           and vocab_sharding_pays(embed.weight.shape[0], shards, tokens)),
        )

    @property
    def reduce_bucket(self) -> int:
        """Elements of DeepSpeed's reduce bucket (zero*), as lora_dist.parallel.deepspeed caps it."""
        return int(float(self.zero.get("reduce_bucket_size", 5e8)))

    @property
    def lora_bytes(self) -> int:
        return self.lora_numel * LORA_BYTES

    @property
    def recompute_later(self) -> bool:
        """Checkpointing every Nth block may leave the last blocks' backward without a recompute: then the first
        recompute (the last checkpointed block's) comes after their activations are freed, a moment of its own."""
        return bool(self.checkpointed) and self.checkpointed[-1] < len(self.blocks) - 1

    @property
    def output_head(self) -> torch.nn.Module | None:
        """The model's output head (also one tied to the embedding, not its own unit)."""
        return self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None

    @property
    def nf4_head_rows(self) -> int:
        """The rows of an NF4 output head (model.quantize_embeddings) this rank's loss applies: its vocabulary shard,
        or all of them; 0 where the head is not NF4."""
        output = self.output_head
        if output is None or id(output.weight) not in self.nf4:
            return 0
        return output.weight.shape[0] // (self.shards if self.head_sharded else 1)

    @property
    def head_in_blocks(self) -> bool:
        """The chunked loss dequantizes the head a block of vocabulary rows at a time (:class:`lora_dist.loss._Head`):
        an NF4 head of more than one block's rows on this rank."""
        from lora_dist.loss import HEAD_BLOCK_ROWS

        return bool(self.chunk) and self.nf4_head_rows > HEAD_BLOCK_ROWS

    def stored(self, q: torch.nn.Parameter, numel: int, elt: int) -> int:
        """Bytes of ``numel`` elements of ``q`` held in ``elt``-byte elements, or as NF4."""
        from lora_dist.nf4 import nf4_bytes

        return nf4_bytes(numel, self.base_elt) if id(q) in self.nf4 else numel * elt

    def gathered_bytes(self, params) -> int:
        """What gathering ``params`` holds (the LoRA params are never gathered; over one shard rank neither are NF4
        weights: they stay out of FSDP2)."""
        return sum(self.stored(q, q.numel(), self.compute_elt) for q in params
                   if id(q) not in self.lora and not (self.shards == 1 and id(q) in self.nf4))


@dataclass
class _State:
    """The state a rank holds besides the activations, and what the base holds gathered at each moment."""

    base_shard: int = 0
    base_replicated: int = 0
    lora_params: int = 0
    lora_grads: int = 0
    optimizer_state: int = 0
    buffers: int = 0
    gathered: int = 0  # at backward's start
    loss_gathered: int = 0  # at the loss
    recompute_gathering: int = 0  # what the first recompute holds gathered beyond backward's start
    forward_gathered: int | None = None  # fsdp2: what forward's start holds gathered, where it may be the peak


def _dequantized(r: _Run) -> tuple[int, int]:
    """NF4 weights are dequantized one at a time: a block's linear for its matmul, with its block gathered; with an
    NF4 head (model.quantize_embeddings) the head's rows for the loss (this rank's vocabulary shard, or all of
    them), before backward gathers or recomputes any block: the chunked loss dequantizes
    :data:`lora_dist.loss.HEAD_BLOCK_ROWS` of them at a time, the plain loss all. An NF4 embedding dequantizes only
    the rows it looks up. A sharded head stored wider than the compute dtype (fsdp2's bf16 mixed precision over an
    fp32 base) is cast for the loss too, whole. Returns ``(a block's, the head's)`` (the head's: a copy in the
    compute dtype, held at the loss)."""
    from lora_dist.loss import HEAD_BLOCK_ROWS

    in_blocks = {id(q) for b in r.blocks for q in b.parameters()}
    block = max((q.numel() for _, q in r.base if id(q) in r.nf4 and id(q) in in_blocks), default=0) * r.compute_elt
    head, rows = 0, r.nf4_head_rows
    if rows:
        head = (min(rows, HEAD_BLOCK_ROWS) if r.chunk else rows) * r.output_head.weight.shape[1] * r.compute_elt
    elif r.head_sharded and r.base_elt != r.compute_elt:  # fp32 shards under bf16 mixed precision: cast, whole
        head = r.output_head.weight.numel() // r.shards * r.compute_elt
    return block, head


def _fsdp2_state(r: _Run, s: _State) -> None:
    """fsdp2: each rank's shard of the base, and what the base holds gathered at each moment."""
    from lora_dist.lora import lora_parameters
    from lora_dist.parallel.parallelize import fsdp2_units, reshard_size, weight_units

    p, base, blocks = r.p, r.base, r.blocks
    s.base_shard = sum(r.stored(q, _fsdp_shard_numel(tuple(q.shape), r.shards), r.base_elt) for _, q in base)
    if not p.reshard_after_forward:
        s.gathered = s.loss_gathered = r.gathered_bytes(q for _, q in base)
        return
    # The units parallelize() makes: each block, the input embedding and the output head (when untied), and the
    # root with the rest. Backward starts with the root's rest, the head (kept gathered since its forward; not
    # gathered at all when the loss runs on its shards) and three blocks: the one running, the next one gathered,
    # and the flat all-gather output of the one after (FSDP2 all-gathers into one buffer, then copies out into the
    # params). The embedding, resharded after forward, is not needed by backward (parallelize:
    # set_unshard_in_backward).
    units = _fsdp2_side_units(r.model)
    in_unit = {id(q) for m in (*blocks, *units) for q in m.parameters()}
    root_rest = r.gathered_bytes(q for _, q in base if id(q) not in in_unit)
    block = max((r.gathered_bytes(b.parameters()) for b in blocks), default=0)
    # Forward holds as many: the block running, and the next one's all-gather output and params (measured in the
    # live tensors of a 2-block model: three blocks at the second block's copy-out).
    running, first = 3 * block, 3 * block
    recompute_running = running  # what the first recompute holds gathered (recompute_later)
    if p.shard_unit == "weight":
        # Each weight matrix its own unit: forward holds three at a time, as for blocks. Backward recomputing a
        # checkpointed block gathers all of its units (FSDP2 does not reshard in a recompute) plus the all-gather
        # output of the last; without checkpointing, backward holds the unit running, the next one and the
        # all-gather output of the one after, as for blocks.
        lora_set = set(lora_parameters(r.model))
        unit = max((r.gathered_bytes(m.parameters()) for b in blocks for m in weight_units(b, lora_set)), default=0)
        plain = min(3 * unit, 3 * block)
        recompute_running = block + unit
        if r.recompute_later or not r.checkpointed:  # backward's start runs a block not checkpointed
            running = plain
        elif len(r.checkpointed) == len(blocks):
            running = recompute_running
        else:  # the last block recomputed; the blocks not checkpointed run later: the larger of the two
            running = max(recompute_running, plain)
        first = 3 * unit
    kept_head = r.gathered_bytes(r.head.parameters()) if r.head is not None and not r.head_sharded else 0
    whole = r.gathered_bytes(q for _, q in base)
    s.gathered = min(root_rest + kept_head + running, whole)
    s.recompute_gathering = min(root_rest + kept_head + recompute_running, whole) - s.gathered
    s.loss_gathered = min(root_rest + kept_head, s.gathered)
    if r.embed is not None:
        # Forward's start: the root's rest and the embedding gathered (or, looked up on its shards, the
        # reduce-scatter's input of every rank's tokens and this rank's rows of them), and the first blocks
        # gathered as above.
        lookup = (r.shards + 1) * r.tokens * r.embed.weight.shape[1] * r.compute_elt if r.embed_sharded else \
            r.gathered_bytes(r.embed.parameters())
        s.forward_gathered = root_rest + lookup + first
    after_forward = reshard_size(p, r.shards, r.ranks_per_node)
    if after_forward is not True:
        # Resharded to N ranks (reshard_after_forward=N, or node resolved to the node's ranks): every block and the
        # embedding keep a 1/N shard from their forward until backward gathers them again.
        # A unit holding an NF4 weight reshards fully instead (fsdp2_units); the head is never resharded, and an
        # embedding looked up on its shards is never gathered.
        n = max(int(after_forward), 1)
        units = fsdp2_units(blocks, r.embed, r.head, p.shard_unit, set(lora_parameters(r.model)), after_forward,
                            lambda q: id(q) in r.nf4)
        shards_kept = sum(r.stored(q, math.ceil(q.numel() / n), r.compute_elt)
                          for module, params, after in units if not isinstance(after, bool)
                          and not (module is r.embed and r.embed_sharded) for q in params)
        s.gathered += shards_kept
        s.loss_gathered += shards_kept


def _zero3_state(r: _Run, s: _State) -> None:
    """zero3: DeepSpeed's partitions of the base and of the LoRA, what it keeps whole, and what it gathers."""
    W, base, lora_numel, base_numel = r.world, r.base, r.lora_numel, r.base_numel
    zero = r.zero
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    s.base_shard = sum(math.ceil(q.numel() / W) for _, q in base) * r.base_elt
    s.base_replicated = sum(q.numel() for _, q in base if q.numel() < threshold) * r.base_elt
    # The LoRA stays fp32 (injected after zero.Init, which DeepSpeed's bf16 does not cast): whole (persistent) and
    # its fp32 partition, which is the optimizer's master (DeepSpeed makes no copy of an fp32 partition).
    partition = math.ceil(lora_numel / W)
    s.lora_params = r.lora_bytes + partition * LORA_BYTES
    # Backward copies each full gradient into the fp32 reduce bucket (the buffers below) and drops it once reduced
    # into this rank's gradient partition, held in DeepSpeed's gradient-accumulation dtype (the model's: bf16 under
    # its bf16); each reduction concatenates the bucket's gradients into a flat fp32 copy (reduce_scatter_coalesced),
    # up to a bucket more while backward runs.
    s.lora_grads = partition * r.compute_elt + r.reduce_bucket * LORA_BYTES
    s.optimizer_state = 2 * partition * LORA_BYTES  # AdamW's two moments
    prefetch = int(float(zero.get("stage3_prefetch_bucket_size", 5e7)))
    max_live = int(float(zero.get("stage3_max_live_parameters", 1e9)))
    reuse = int(float(zero.get("stage3_max_reuse_distance", 1e9)))
    if reuse >= base_numel:
        # Every parameter is reused by backward within the reuse distance, so none is released after forward: the
        # whole base stays gathered until backward (up to max_live_parameters).
        s.gathered = s.loss_gathered = min(max_live, base_numel) * r.compute_elt
    else:  # the module running (at most the largest weight) plus the prefetch bucket
        largest_base = max((q.numel() for _, q in base), default=0)
        s.gathered = s.loss_gathered = min(largest_base + prefetch, base_numel) * r.compute_elt
    s.buffers = r.reduce_bucket * LORA_BYTES


def _sharded_adamw_state(r: _Run, s: _State) -> None:
    """ShardedAdamW: flat fp32 buckets padded to a multiple of W; the params are views of them, backward moves the
    gradients into flat copies of them; this rank's slices: master, two moments, gradient."""
    from lora_dist.lora import lora_modules
    from lora_dist.parallel.reducer import fill_buckets
    from lora_dist.parallel.sharded_adamw import IN_FLIGHT

    W = r.world
    named = [getattr(m, part).weight for _, m in lora_modules(r.model) for part in ("lora_A", "lora_B")]
    slices = [math.ceil(sum(q.numel() for q in b) / W)
              for b in fill_buckets(named, lambda q: q.numel() * LORA_BYTES, r.p.bucket_mb)]
    s.lora_params = s.lora_grads = sum(slices) * W * LORA_BYTES
    if r.cfg.train.grad_accum == 1:
        # Each bucket's full-size gradient is freed once its reduce-scatter is done: backward holds the bucket
        # filling, the one just launched and IN_FLIGHT running (micro-steps under no_sync hold all).
        s.lora_grads = min(s.lora_grads, (IN_FLIGHT + 2) * max(slices) * W * LORA_BYTES)
    s.optimizer_state = 3 * sum(slices) * LORA_BYTES
    s.buffers = sum(slices) * LORA_BYTES


def _state(r: _Run) -> _State:
    """Everything a rank holds but the activations, by strategy."""
    p, lora_bytes = r.p, r.lora_bytes
    s = _State(lora_params=lora_bytes, lora_grads=lora_bytes, optimizer_state=2 * lora_bytes)
    block_dequantized, head_dequantized = _dequantized(r)
    sharded = p.shard_optimizer and r.world > 1 and p.strategy in ("fsdp2", "ddp")
    if p.strategy == "fsdp2":
        _fsdp2_state(r, s)
        s.gathered += block_dequantized
        s.loss_gathered += head_dequantized
        if not sharded:
            s.buffers = min(int(p.bucket_mb * 1e6), lora_bytes)  # the flat copy of one gradient bucket
    elif p.strategy == "zero3":
        _zero3_state(r, s)
    elif p.strategy in ("zero1", "zero2"):
        # DeepSpeed's ZeRO optimizer holds the LoRA params as one flat tensor, whole on every rank, in bf16 under its
        # bf16, and so their gradients and its reduce bucket (lora_dist sets no grad_accum_dtype); an fp32 master of
        # this rank's partition and its two moments are the optimizer state. zero1 keeps every full gradient until
        # the step reduces them; zero2 copies each into the reduce bucket as backward makes it and keeps this rank's
        # partition of the reduced ones.
        elt = min(r.compute_elt, LORA_BYTES)
        partition = math.ceil(r.lora_numel / r.world)
        s.base_shard = r.base_numel * r.base_elt
        s.lora_params = r.lora_numel * elt
        s.lora_grads = (r.lora_numel if p.strategy == "zero1" else partition) * elt
        s.optimizer_state = 3 * partition * LORA_BYTES
        s.buffers = r.reduce_bucket * elt
    else:  # ddp, none
        s.base_shard = sum(r.stored(q, q.numel(), r.base_elt) for _, q in r.base)
        s.gathered, s.loss_gathered = block_dequantized, head_dequantized
        if p.strategy == "ddp" and not sharded:
            s.buffers = lora_bytes  # DDP's gradient buckets hold a second copy of the gradients
    if sharded:
        _sharded_adamw_state(r, s)
    if s.forward_gathered is not None:
        s.forward_gathered += block_dequantized
    return s


@dataclass
class _Activations:
    """What autograd keeps for backward, and the loss's own buffers."""

    saved: int  # from forward to backward: blocks not checkpointed, the checkpointed blocks' inputs, the final norm's
    kept_per_block: int  # by a block not checkpointed
    recompute: int  # by the block backward recomputes (checkpointing)
    offloaded: int  # checkpointed inputs waiting in host memory (parallel.offload_activations)
    loss: int  # the chunked loss's buffers, or the full logits'
    block_grads: int  # a block's backward: the gradient of its output, and of the routed experts' (MoE)


def _activations(r: _Run) -> _Activations:
    from lora_dist.lora import LoRAParam, lora_modules

    p, hf_config, tokens, elt = r.p, r.hf_config, r.tokens, r.compute_elt
    ranks_per_block = 0
    if r.blocks:
        # An adapter on a parameter saves no per-token activation (its delta is on the weight side).
        ranks_per_block = sum(m.r for _, m in lora_modules(r.blocks[0]) if not isinstance(m, LoRAParam))
    # A compiled block runs without selective recompute, and is planned as an eager one without it: an upper bound,
    # as the compiler recomputes cheap work itself (on the CPU the compiled step's RSS was 2-8% below that of eager
    # blocks without selective recompute, docs/bench.md; on a GPU not yet measured).
    selective = p.selective_recompute and not p.compile
    hidden, vocab = r.hidden, getattr(hf_config, "vocab_size", 0) or 0
    n_checkpointed = len(r.checkpointed)
    offloaded = recompute = 0
    # Blocks not checkpointed keep what autograd keeps (all of them without checkpointing).
    kept_per_block = tokens * _block_activation_bytes(hf_config, ranks_per_block, elt, selective)
    saved = (len(r.blocks) - n_checkpointed) * kept_per_block
    if n_checkpointed:
        inputs = tokens * n_checkpointed * hidden * elt  # each checkpointed block's input
        # Backward recomputes one block at a time, under checkpointing's hooks (the gated product is kept).
        recompute = tokens * _block_activation_bytes(hf_config, ranks_per_block, elt, selective, True)
        if p.offload_activations:
            # lora_dist.parallel.checkpointing.HostActivations: each block's input waits in host memory (Hugging
            # Face binds the other arguments, such as the rotary cos/sin all blocks share, to the function it
            # checkpoints: they stay where they are); the block recomputed is on the device.
            offloaded = inputs
        else:
            saved += inputs
    saved += tokens * hidden * (elt if selective else 4)  # the final norm's input
    if r.chunk:
        # lora_dist.loss.linear_cross_entropy_sum: the hidden states and their gradient; per chunk of up to
        # train.loss_chunk tokens, their logits over this rank's vocabulary rows (all of them, or 1/W of them with
        # the head left sharded) in fp32, turned into the softmax in place (+ its 16-bit cast). With the head
        # sharded also every shard-group rank's hidden states (gathered), the fp32 gradient of this rank's and
        # each chunk's fp32 product to reduce-scatter. An NF4 head dequantized a block of vocabulary rows at a time:
        # the 16-bit logits and softmax are a block wide, and so is the 16-bit product of each block, summed in
        # fp32 (with the head sharded, that sum is the product to reduce-scatter, and the fp32 logits are a block
        # wide too: the log-sum-exp is kept over the blocks).
        from lora_dist.loss import HEAD_BLOCK_ROWS

        groups = r.shards if r.head_sharded else 1
        rows = groups * min(tokens, max(1, r.cfg.train.loss_chunk // groups))
        cast = elt if elt != 4 else 0
        columns = math.ceil(vocab / groups)
        loss = 2 * tokens * hidden * elt
        if r.head_in_blocks:
            block = min(columns, HEAD_BLOCK_ROWS)
            loss += rows * (block if r.head_sharded else columns) * 4 + rows * block * cast + rows * hidden * cast
            if not r.head_sharded:
                loss += rows * hidden * 4
        else:
            loss += rows * columns * (4 + cast)
        if r.head_sharded:
            loss += groups * tokens * hidden * elt + tokens * hidden * 4 + rows * hidden * 4
    else:
        loss = 3 * tokens * vocab * 4  # logits, fp32 copy, log-softmax
    # A block's backward: the gradient of the hidden states; MoE: of each routed token's expert output and gate_up
    # output too (top_k per token).
    experts, top_k = _experts(hf_config)
    moe_inter = getattr(hf_config, "moe_intermediate_size", None) or getattr(hf_config, "intermediate_size", 0) or 0
    block_grads = tokens * (hidden + (top_k * (hidden + 2 * moe_inter) if experts else 0)) * elt
    return _Activations(saved=saved, kept_per_block=kept_per_block, recompute=recompute, offloaded=offloaded,
                        loss=loss, block_grads=block_grads)


def _moments(r: _Run, s: _State, a: _Activations, adapted_per_block: int) -> dict[str, dict[str, int]]:
    """The moments that may hold the most, each as its terms that change over a step (the peak is the largest).
    Gradients exist from backward's start on (before it only those accumulated over micro-steps)."""
    hidden_state = r.tokens * r.hidden * r.compute_elt
    block_grads = a.block_grads
    n_blocks, n_checkpointed = len(r.blocks), len(r.checkpointed)
    # Blocks not checkpointed keep their adapted experts from forward to backward; checkpointed ones one at a time.
    adapted_experts = adapted_per_block * max(n_blocks - n_checkpointed + (1 if n_checkpointed else 0), 1)
    accumulated = s.lora_grads if r.cfg.train.grad_accum > 1 else 0
    moments = {
        # The loss and the head's backward: every saved activation and the loss's buffers; of the base, the root's
        # rest and the head (or the NF4 head's rows dequantized); no block gathered.
        "the loss": dict(gathered=s.loss_gathered, activations=a.saved + a.loss, lora_grads=accumulated,
                         adapted_experts=adapted_experts),
        # The last block's backward: the blocks it gathers (and dequantizes), the saved activations, the block
        # recomputed (checkpointing), and the gradients it makes (the hidden states'; MoE: the routed experts').
        "backward's start": dict(gathered=s.gathered,
                                 activations=a.saved + (0 if r.recompute_later else a.recompute) + block_grads,
                                 lora_grads=s.lora_grads, adapted_experts=adapted_experts),
    }
    if r.recompute_later:
        # Checkpointing every Nth block: the last checkpointed block's recompute, the blocks after it done (their
        # activations and adapted experts freed).
        after = n_blocks - 1 - r.checkpointed[-1]
        moments["the first recompute"] = dict(
            gathered=s.gathered + s.recompute_gathering,
            activations=a.saved - after * a.kept_per_block + a.recompute + block_grads,
            lora_grads=s.lora_grads, adapted_experts=adapted_experts - after * adapted_per_block)
    if s.forward_gathered is not None:
        # Forward's start holds the embedding instead of the blocks, the head and the activations (the embedding's
        # output only).
        moments["forward's start"] = dict(gathered=s.forward_gathered, activations=hidden_state,
                                          lora_grads=accumulated, adapted_experts=0)
    return moments


def _plan(cfg: Config, world_size: int, hf_config, model: torch.nn.Module, ranks_per_node: int) -> MemoryPlan:
    """The plan of ``cfg`` (an explicit strategy) for ``model``, the meta skeleton with LoRA injected."""
    from lora_dist.lora import LoRAParam, lora_modules

    r = _Run.of(cfg, world_size, hf_config, model, ranks_per_node)
    s = _state(r)
    a = _activations(r)

    experts, top_k = _experts(hf_config)
    expert_numel = sum(q.numel() for _, q in _expert_params(model, r.lora))
    active = r.base_numel - expert_numel + (expert_numel // experts * top_k if experts else 0)
    expert_lora = [m for _, m in lora_modules(model) if isinstance(m, LoRAParam) and m.num_experts > 1]
    expert_lora_numel = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in expert_lora)
    adapted_per_block = sum(m.base_weight().numel() for m in expert_lora) // max(len(r.blocks), 1) * r.compute_elt

    moments = _moments(r, s, a, adapted_per_block)
    peak_at = max(moments, key=lambda moment: sum(moments[moment].values()))
    peak = moments[peak_at]
    rest = s.base_shard + s.base_replicated + s.lora_params + s.optimizer_state + s.buffers
    model_elt = parse_dtype(cfg.model.dtype).itemsize  # the checkpoint's and the export's (not DeepSpeed's bf16)
    largest = max((q.numel() * (LORA_BYTES if id(q) in r.lora else model_elt) for q in model.parameters()),
                  default=0)
    p = r.p
    node = p.strategy == "fsdp2" and p.reshard_after_forward == "node"
    return MemoryPlan(
        strategy=p.strategy, world_size=world_size, tokens_per_micro_batch=r.tokens,
        activation_checkpointing=p.activation_checkpointing, mode=mode_name(p),
        num_params=r.base_numel + r.lora_numel, num_lora_params=r.lora_numel, num_expert_params=expert_numel,
        num_active_params=active, num_expert_lora_params=expert_lora_numel,
        model_bytes=r.base_numel * model_elt, largest_tensor_bytes=largest,
        base_shard=s.base_shard, base_replicated=s.base_replicated, lora_params=s.lora_params,
        lora_grads=peak["lora_grads"], optimizer_state=s.optimizer_state, activations=peak["activations"],
        gathered=peak["gathered"], buffers=s.buffers, adapted_experts=peak["adapted_experts"],
        dp_replicate=world_size // r.shards if p.strategy == "fsdp2" else 1, peak_at=peak_at,
        offloaded=a.offloaded, moments={moment: rest + sum(terms.values()) for moment, terms in moments.items()},
        runs_as=(f"parallel.strategy=fsdp2 over one shard rank shards nothing: it runs as {p.strategy}, the same "
                 "math without FSDP2's per-step weight copies" if p.strategy != cfg.parallel.strategy else ""),
        ranks_per_node=ranks_per_node if node else None, node_reshard=_node_reshard(r) if node else "",
    )


def _node_reshard(r: _Run) -> str:
    """What ``parallel.reshard_after_forward=node`` was planned as: the ranks per node and what a block keeps."""
    from lora_dist.parallel.parallelize import reshard_size

    n = r.ranks_per_node
    if n < 1:
        return ("parallel.reshard_after_forward=node: the launch does not say how many ranks a node runs; planned "
                "as true, as the run reshards then")
    after = reshard_size(r.p, r.shards, n)
    kept = (f"a node holds all {r.shards} ranks the base is sharded over: as true" if after is True else
            "as false: every block stays gathered" if after is False else
            f"every block keeps a 1/{after} shard from forward to backward")
    return (f"parallel.reshard_after_forward=node planned with {n} ranks per node (lora-dist plan --ranks-per-node): "
            f"{kept}")
