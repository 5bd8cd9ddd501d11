"""``parallel.compile``: each transformer block compiled by ``torch.compile``, the rest of the model eager.

A LoRA step over a frozen base is its matmuls plus a long tail of small elementwise kernels
(norms, rotary embeddings, the gated MLP's activation, LoRA's scale and add, residual adds).
Compiling a block fuses that tail into fewer kernels and, on a GPU, cuts the kernel launches
the host must issue. One block at a time, as torchtitan and torchtune do: the repeated blocks
share their compiled graphs (their parameters are the graphs' inputs): one for the first block,
whose input needs no gradient, one for the others, and one more per new input layout (a packed
batch's mask, a new length, which then compiles as dynamic, eval's no-grad forward). So compile
time does not grow with depth, and what surrounds the blocks (the embedding, the head and the
chunked loss, FSDP2's and DeepSpeed's hooks) stays eager.

Each block is compiled in place (``nn.Module.compile``), so every parameter name, the
checkpoints and the export are those of the eager model. With ``lora.dropout`` > 0 the compiled
kernels draw their own masks: the same distribution as eager, not the same masks. The compiler's
own partition of forward and backward recomputes cheap elementwise work instead of keeping it (AOTAutograd's
min-cut rematerialization), which is what ``parallel.selective_recompute`` does by hand in
eager mode; the two are not combined (selective recompute's saved-tensor hooks would split
the compiled graph), so a compiled block runs without it.

All blocks share one compiled entry point, and torch compiles at most
``torch._dynamo.config.recompile_limit`` (8 by default) variants of one, then runs the rest
eagerly without a word; first/other block x mask/no mask x static/dynamic length x grad/no
grad (eval) x a model's layer types reach that (and checkpointing every Nth block compiles the
other blocks twice, checkpointed and not), so :func:`compile_blocks` raises it to
:data:`RECOMPILE_LIMIT` (a process-wide setting). A checkpointed block compiles whole only where
the compiler lets its forward's side effects go unreplayed in the recompute (another process-wide
setting :func:`compile_blocks` makes): Hugging Face's kernel selection sets a context variable in
every attention forward (transformers 5.25 with its ``kernels``).

Not for ``zero3`` (DeepSpeed's parameter gathers run as hooks inside every block), an NF4 base
(each weight is dequantized by its own autograd function) or checkpointed inputs offloaded to
host memory (the offload's hooks wrap the checkpoint inside the block, where the compiler cannot
enter them): refused in one line (:meth:`lora_dist.config.ParallelConfig.why_not_compiled`). The first
step pays the compile: seconds to tens of seconds.
"""

from __future__ import annotations

import torch.nn as nn

from lora_dist.errors import ConfigError

__all__ = ["RECOMPILE_LIMIT", "compile_blocks"]

#: Compiled variants of the blocks' shared entry point before torch runs further ones eagerly.
RECOMPILE_LIMIT = 64


def compile_blocks(blocks: list[nn.Module]) -> int:
    """Compile each of ``blocks`` in place (:meth:`torch.nn.Module.compile`; names and parameters unchanged) and
    raise torch's recompile limit to :data:`RECOMPILE_LIMIT`. Returns how many were compiled.

    Raises:
        ConfigError: there are no blocks (a model lora_dist finds no transformer blocks in).
    """
    if not blocks:
        raise ConfigError("parallel.compile found no transformer blocks to compile in this model; set "
                          "parallel.compile=false")
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # Hugging Face's kernel selection (the kernels package, which transformers 5.25 requires) sets a context variable
    # around each attention forward. Inside a checkpointed block the compiler refuses that side effect, since eager
    # checkpointing would replay it in the recompute, and the block runs eagerly without a word. It only picks
    # kernels while tracing, so the compiled recompute needs no replay of it.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks:
        block.compile()
    return len(blocks)
