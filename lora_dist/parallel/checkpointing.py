"""Activation checkpointing of the transformer blocks, and where their checkpointed inputs wait for backward.

Every block is recomputed in backward (non-reentrant checkpointing, as Hugging Face
models run it: parameter names unchanged, no input needs to require grad - the LoRA
params inside each block are enough). What a checkpointed block keeps from its
forward is its inputs: for a Llama-family model one ``tokens x hidden`` tensor per
block, 80 of them (1.3 GB per GPU) for Llama-3.1-70B at 1,024 tokens per rank.

With ``parallel.offload_activations`` those inputs wait in host memory instead:
:class:`HostActivations` packs every tensor the checkpoint saves for backward into a
host copy (pinned on a GPU, copied without blocking the host) and unpacks it to the
device when backward recomputes the block. Only the checkpoint's own inputs pass
through it: inside the block, checkpointing's hooks take over (the innermost
``saved_tensors_hooks`` apply), so nothing is offloaded twice and the recomputed
activations stay on the device.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["HostActivations", "enable_activation_checkpointing"]


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


def enable_activation_checkpointing(model: nn.Module, offload: bool = False) -> HostActivations | None:
    """Recompute each transformer block in backward; with ``offload``, keep its checkpointed inputs in host memory.

    Returns:
        the offloading hooks (their :attr:`HostActivations.packed_bytes`), or None without ``offload``.

    Raises:
        ValueError: the model is not a Hugging Face model with gradient checkpointing.
    """
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("parallel.activation_checkpointing needs a Hugging Face model; set it to false")
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
