"""``parallel.compile``: each transformer block compiled by ``torch.compile``, the rest of the model eager.

A LoRA step over a frozen base is its matmuls plus a long tail of small elementwise kernels
(norms, rotary embeddings, the gated MLP's activation, LoRA's scale and add, residual adds).
Compiling a block fuses that tail into a few kernels and, on a GPU, cuts the kernel launches
the host must issue. One block at a time, as torchtitan and torchtune do: the repeated blocks
share one compiled graph (their parameters are the graph's inputs), so compile time does not
grow with depth, and what surrounds the blocks (the embedding, the head and the chunked loss,
FSDP2's and DeepSpeed's hooks) stays eager.

Each block is compiled in place (``nn.Module.compile``), so every parameter name, the
checkpoints and the export are those of the eager model. The compiler's own partition of
forward and backward recomputes cheap elementwise work instead of keeping it (AOTAutograd's
min-cut rematerialization), which is what ``parallel.selective_recompute`` does by hand in
eager mode; the two are not combined (selective recompute's saved-tensor hooks would only
split the compiled graph), so a compiled block runs without it.

Not for ``zero3`` (DeepSpeed's parameter gathers run as hooks inside every block; refused in
one line) or an NF4 base (each weight is dequantized by its own autograd function; refused).
The first step pays the compile: tens of seconds on a CPU, less on a GPU; a new shape of
micro-batch compiles once more, then shapes are treated as dynamic.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["compile_blocks", "why_not_compiled"]


def why_not_compiled(strategy: str, quantize: str = "") -> str | None:
    """Why ``parallel.compile`` cannot apply to this run (None when it can)."""
    if strategy == "zero3":
        return ("zero3 gathers each weight in hooks inside the blocks, which the compiler cannot trace; use "
                "parallel.strategy=fsdp2 (the same sharding) or parallel.compile=false")
    if quantize:
        return f"an {quantize} base is dequantized weight by weight outside the compiler's reach; set parallel.compile=false"
    return None


def compile_blocks(blocks: list[nn.Module]) -> int:
    """Compile each of ``blocks`` in place (:meth:`torch.nn.Module.compile`; names and parameters unchanged).
    Returns how many were compiled."""
    if not blocks:
        raise ValueError("parallel.compile found no transformer blocks to compile; set parallel.compile=false")
    for block in blocks:
        block.compile()
    return len(blocks)
