"""What the frozen base keeps for backward: activation checkpointing of the transformer blocks, where their
checkpointed inputs wait, and the cheap elementwise work recomputed instead of kept.

Each checkpointed block is recomputed in backward (non-reentrant checkpointing, as
Hugging Face models run it: parameter names unchanged, no input needs to require grad -
the LoRA params inside each block are enough). What a checkpointed block keeps from its
forward is its inputs: for a Llama-family model one ``tokens x hidden`` tensor per
block, 80 of them (1.3 GB per GPU) for Llama-3.1-70B at 1,024 tokens per rank.

``parallel.activation_checkpointing=N`` checkpoints every Nth block only (blocks 0, N,
2N, ...: Hugging Face's ``every_n_layers``, torchtitan's layer option); the others keep
their activations as without checkpointing. Recompute costs about one block forward per
checkpointed block, so where memory allows, a fraction of the blocks is the faster run
(:func:`checkpointed_blocks`; ``parallel.strategy=auto`` tries every 4th and every 2nd
block before every block).

With ``parallel.offload_activations`` those inputs wait in host memory instead:
:class:`HostActivations` packs every tensor the checkpoint saves for backward into a
host copy (pinned on a GPU, copied without blocking the host) and unpacks it to the
device when backward recomputes the block. Only the checkpoint's own inputs pass
through it: inside the block, checkpointing's hooks take over (the innermost
``saved_tensors_hooks`` apply), so nothing is offloaded twice and the recomputed
activations stay on the device.

**Selective recompute** (``parallel.selective_recompute``, on by default) keeps less
without recomputing any matmul. The base is frozen, so what autograd keeps inside a
block is only what the input gradients and the LoRA gradients need, and two parts of it
are cheap to compute again:

* **RMSNorm in a 16-bit model.** Hugging Face's norms compute in fp32, and autograd keeps
  the fp32 copy of their input (twice the bytes of the input). A recomputed norm keeps its
  16-bit input and computes the rest again in backward.
* **The gated MLP** (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, the forward of
  Llama, Mistral, Qwen, Gemma and some 120 other Hugging Face MLPs, recognized by its
  source). Autograd keeps ``gate``, ``act_fn(gate)``, ``up`` and their product (the input
  of ``down_proj``'s LoRA): four tensors of the MLP's width per token. Recomputed, it
  keeps ``gate`` and ``up``; the product is computed again from them where ``down_proj``'s
  backward needs it.

Per token and block that is ``2 x hidden + 2 x MLP width`` elements fewer in bf16 (about
a third of a Llama block's activations) and ``2 x MLP width`` in fp32. Recomputing runs
the very same operations on the very same inputs, so forward and gradients are bitwise
those of the plain model (tested). It applies where every parameter of the module is
frozen and grad mode is on; under someone else's saved-tensor hooks (checkpointing,
offloading) the product is left to them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn as nn

from lora_dist.blocks import find_blocks

__all__ = ["HostActivations", "checkpoint_blocks", "checkpointed_blocks", "enable_activation_checkpointing",
           "enable_selective_recompute"]


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors go to host memory until backward unpacks them (``torch.autograd.graph.save_on_cpu``, with
    non-blocking copies into pinned memory on a GPU, and a count of what went).

    On the CPU the copy is another host tensor: the device tensor is released all the same (tested), but
    there is no other memory to move to.
    """

    def __init__(self) -> None:
        self.packed_bytes = 0
        """Bytes packed so far (every block, every step): what device memory did not hold."""

        def pack(tensor: torch.Tensor):
            cuda = tensor.device.type == "cuda"
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=cuda)
            host.copy_(tensor, non_blocking=cuda)
            self.packed_bytes += tensor.numel() * tensor.element_size()
            return tensor.device, host

        def unpack(packed) -> torch.Tensor:
            device, host = packed
            return host.to(device, non_blocking=device.type == "cuda")

        super().__init__(pack, unpack)


def _offloaded(checkpoint: Callable, hooks: HostActivations) -> Callable:
    @functools.wraps(checkpoint)
    def run(*args, **kwargs):
        with hooks:
            return checkpoint(*args, **kwargs)

    return run


def checkpointed_blocks(n_blocks: int, every: bool | int) -> list[int]:
    """The indices of the blocks ``parallel.activation_checkpointing=every`` recomputes in backward: all of them
    (true or 1), none (false or 0), or every Nth (0, N, 2N, ...)."""
    step = int(every)
    return list(range(0, n_blocks, step)) if step > 0 else []


def checkpoint_blocks(blocks: list[nn.Module], every: bool | int) -> None:
    """Switch checkpointing on for the :func:`checkpointed_blocks` of ``blocks`` and off for the others (Hugging
    Face's ``GradientCheckpointingLayer`` reads its switch at each call, so this may change between steps)."""
    kept = set(checkpointed_blocks(len(blocks), every))
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i in kept


def enable_activation_checkpointing(model: nn.Module, offload: bool = False,
                                    every: bool | int = True) -> HostActivations | None:
    """Recompute transformer blocks in backward - each one, or every ``every``-th (:func:`checkpointed_blocks`);
    with ``offload``, keep their checkpointed inputs in host memory.

    Returns:
        the offloading hooks (their :attr:`HostActivations.packed_bytes`), or None without ``offload``.

    Raises:
        ValueError: the model is not a Hugging Face model with gradient checkpointing, or (``every`` > 1) its
        blocks do not each carry their own checkpointing switch.
    """
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("parallel.activation_checkpointing needs a Hugging Face model; set it to false")
    if int(every) > 1:
        blocks = find_blocks(model)
        if not blocks or not all(getattr(b, "gradient_checkpointing", None) is True for b in blocks):
            raise ValueError(f"parallel.activation_checkpointing={int(every)} needs blocks that each switch "
                             f"checkpointing on or off, which {type(model).__name__}'s do not; set it to true")
        checkpoint_blocks(blocks, every)
    if getattr(model, "_require_grads_hook", None) is not None:
        # Hugging Face makes the embedding's output require grad for reentrant checkpointing; the non-reentrant
        # kind does not need it, and with it backward computes the first block's input gradient for nothing.
        model.disable_input_require_grads()
    if not offload:
        return None
    hooks = HostActivations()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and callable(getattr(m, "_gradient_checkpointing_func", None))]
    if not layers:
        raise ValueError(f"{type(model).__name__} runs no checkpointing function lora_dist can wrap; set "
                         "parallel.offload_activations=false")
    for layer in layers:
        layer._gradient_checkpointing_func = _offloaded(layer._gradient_checkpointing_func, hooks)
    return hooks


class _Recomputed(torch.autograd.Function):
    """``fn(*inputs)`` that keeps only its inputs for backward and runs ``fn`` again there (``fn`` must hold no
    parameter that needs a gradient: only the inputs get one)."""

    @staticmethod
    def forward(ctx, fn: Callable, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


class _Recipe:
    """A saved tensor not kept: how to compute it again (``make``), and the view of it that was saved."""

    __slots__ = ("make", "size", "stride", "offset")

    def __init__(self, make: Callable[[], torch.Tensor], saved: torch.Tensor) -> None:
        self.make, self.size, self.stride, self.offset = make, saved.size(), saved.stride(), saved.storage_offset()

    def __call__(self) -> torch.Tensor:
        return self.make().as_strided(self.size, self.stride, self.offset)


class _RecomputeWhenSaved(torch.autograd.graph.saved_tensors_hooks):
    """While active, a saved tensor (or view) of ``tensor``'s storage is kept as a :class:`_Recipe` for it."""

    def __init__(self, tensor: torch.Tensor, make: Callable[[], torch.Tensor]) -> None:
        storage, dtype = tensor.untyped_storage().data_ptr(), tensor.dtype

        def pack(saved: torch.Tensor):
            if (type(saved) in (torch.Tensor, nn.Parameter) and saved.dtype == dtype  # not a subclass (NF4)
                    and saved.untyped_storage().data_ptr() == storage):
                return _Recipe(make, saved)
            return saved

        def unpack(packed):
            if isinstance(packed, _Recipe):
                with torch.no_grad():
                    return packed()
            return packed

        super().__init__(pack, unpack)


def _frozen(module: nn.Module) -> bool:
    return not any(q.requires_grad for q in module.parameters())


def _recomputed_norm(module: nn.Module) -> None:
    plain = module.forward

    def forward(hidden_states, *args, **kwargs):
        if (args or kwargs or not torch.is_grad_enabled() or not hidden_states.requires_grad
                or hidden_states.element_size() > 2 or not _frozen(module)):
            return plain(hidden_states, *args, **kwargs)
        return _Recomputed.apply(plain, hidden_states)

    module.forward = forward


def _gated_product(act: nn.Module) -> Callable:
    return lambda gate, up: act(gate) * up


def _recomputed_mlp(module: nn.Module) -> None:
    plain = module.forward
    product_of = _gated_product(module.act_fn)

    def forward(x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled() or not _frozen(module.act_fn):
            return plain(x, *args, **kwargs)
        gate, up = module.gate_proj(x), module.up_proj(x)
        product = _Recomputed.apply(product_of, gate, up)
        if (not product.requires_grad or not product.is_contiguous() or product.storage_offset()
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
            return module.down_proj(product)  # checkpointing or offloading decides what its saved tensors become
        with _RecomputeWhenSaved(product, lambda: product_of(gate, up)):
            return module.down_proj(product)

    module.forward = forward


_GATED_MLP = "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\nreturn down_proj"


@functools.lru_cache(maxsize=None)
def _is_gated_mlp(cls: type) -> bool:
    """``cls.forward(self, x)`` is exactly Hugging Face's gated MLP (comments and blank lines aside)."""
    try:
        lines = inspect.getsource(cls.forward).splitlines()
    except (OSError, TypeError):
        return False
    body = [line.strip() for line in lines[1:] if line.strip() and not line.strip().startswith("#")]
    return lines[0].strip() == "def forward(self, x):" and "\n".join(body) == _GATED_MLP


def enable_selective_recompute(model: nn.Module) -> dict[str, int]:
    """Recompute every RMSNorm and gated MLP product in backward instead of keeping what autograd would
    (module docstring), in place; call before sharding. Returns how many modules of each kind it changed (a
    module whose forward was replaced already, by this or anything else, is left as it is)."""
    counts = {"norms": 0, "mlps": 0}
    for module in model.modules():
        cls = type(module)
        if "forward" in vars(module):
            continue
        if cls.__name__.endswith("RMSNorm") and _frozen(module):
            _recomputed_norm(module)
            counts["norms"] += 1
        elif _is_gated_mlp(cls) and _frozen(module.act_fn):
            _recomputed_mlp(module)
            counts["mlps"] += 1
    return counts
