"""The benchmark's results and ``python -m bench``; its code is :mod:`lora_dist.bench`."""
