"""lora_dist inside other training loops (``docs/integrations.md``).

* :mod:`~lora_dist.integrations.hf`: ``LoraDistTrainer`` (a ``transformers.Trainer``) and ``LoraDistMixin``
  for Trainer subclasses such as TRL's ``SFTTrainer``.
* :mod:`~lora_dist.integrations.accelerate`: a plain ``Accelerator`` loop next to lora_dist's engine, and the
  guard that refuses ``accelerator.prepare(model)`` on a lora_dist model.

Your own torch loop needs no integration: :func:`lora_dist.prepare` returns the model and its engine.
Every way runs the same setup (:mod:`lora_dist.session`), engine, loss and export as ``lora-dist train``.
"""
