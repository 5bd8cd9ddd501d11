"""The lora_dist benchmark: lora_dist fsdp2/zero3/ddp against PEFT + accelerate and full fine-tuning.

``lora-dist bench`` (or ``python -m bench`` from a checkout) runs it; results go to ``bench/results/``; see ``docs/bench.md``.

* :mod:`lora_dist.bench.run`: the driver: one ``torchrun`` launch per configuration and size, then the report.
* :mod:`lora_dist.bench.worker`: what runs on every rank of a launch.
* :mod:`lora_dist.bench.systems`: the configurations, each built the way its users build it.
* :mod:`lora_dist.bench.measure`: peak RSS per phase, live tensor bytes, bytes communicated, the machine.
* :mod:`lora_dist.bench.models`: the Llama-shaped checkpoints and the data.
* :mod:`lora_dist.bench.report`: summary, PASS/FAIL targets, ``results.md``, plots.
"""
