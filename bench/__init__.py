"""The lora_dist benchmark: lora_dist fsdp2/zero3/ddp against PEFT + accelerate and full fine-tuning.

``lora-dist bench`` (or ``python -m bench``) runs it; see ``docs/bench.md``.

* :mod:`bench.run`: the driver: one ``torchrun`` launch per configuration and size, then the report.
* :mod:`bench.worker`: what runs on every rank of a launch.
* :mod:`bench.systems`: the configurations, each built the way its users build it.
* :mod:`bench.measure`: peak RSS per phase, live tensor bytes, bytes communicated, the machine.
* :mod:`bench.models`: the Llama-shaped checkpoints and the data.
* :mod:`bench.report`: summary, PASS/FAIL targets, ``results.md``, plots.
"""
