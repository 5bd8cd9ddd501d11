"""lora_dist in a plain ``accelerate`` loop, and the guard against accelerate wrapping its model again.

A lora_dist model is sharded already (FSDP2/ZeRO-3) and its LoRA gradients are reduced by its engine;
``accelerator.prepare(model)`` would wrap it in DDP (or shard it again) and reduce every gradient twice or
not at all. So accelerate prepares the dataloaders (and logs, prints, gathers metrics) while the engine
does ``backward``/``step``::

    model, engine = lora_dist.prepare(model_dir, LoRAConfig(r=8), strategy="fsdp2")
    accelerator = Accelerator()
    loader = accelerator.prepare(loader)           # never the model or the optimizer
    for batch in loader:
        engine.backward(loss)                      # in place of accelerator.backward(loss)
        engine.step(lr)                            # all-reduce, clip, AdamW

:func:`refuse_rewrap` makes ``accelerator.prepare(model)`` (and ``prepare_model``) fail with one line
instead; :func:`lora_dist.session.build` applies it to every model it makes.
"""

from __future__ import annotations

import torch.nn as nn

from lora_dist.errors import ConfigError

__all__ = ["REWRAP_MESSAGE", "refuse_rewrap"]

#: What ``accelerator.prepare(model)`` on a lora_dist model raises.
REWRAP_MESSAGE = ("this model is lora_dist's: already sharded, with its LoRA gradients reduced by its engine, so "
                  "accelerate must not wrap or shard it again; pass only the dataloaders to accelerator.prepare() "
                  "and use engine.backward()/engine.step() (docs/integrations.md)")


class _OwnedByEngine:
    """Mixed into a lora_dist model's class: accelerate reads ``_is_accelerate_prepared`` before it wraps a model
    itself (no plugin, ``--multi_gpu``, FSDP1), and sets it after its FSDP2 and tensor-parallel paths prepared one
    without asking; either raises. Its DeepSpeed path does neither (:func:`lora_dist.session.prepare` warns)."""

    @property
    def _is_accelerate_prepared(self) -> bool:
        raise ConfigError(REWRAP_MESSAGE)

    @_is_accelerate_prepared.setter
    def _is_accelerate_prepared(self, value: bool) -> None:
        raise ConfigError(REWRAP_MESSAGE)


def refuse_rewrap(module: nn.Module) -> None:
    """Make ``accelerator.prepare(module)`` raise :class:`~lora_dist.config.ConfigError` (:data:`REWRAP_MESSAGE`).

    The module's class becomes a subclass of its own class (as FSDP2's ``fully_shard`` does); nothing else
    about it changes.
    """
    cls = type(module)
    if not issubclass(cls, _OwnedByEngine):
        module.__class__ = type(f"LoraDist{cls.__name__}", (_OwnedByEngine, cls), {})
