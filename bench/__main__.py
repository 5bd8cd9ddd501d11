"""``python -m bench`` from the root of a checkout: the same as ``lora-dist bench``.

The benchmark's code is :mod:`lora_dist.bench`; this folder holds its results (``bench/results/``).
"""

import sys

from lora_dist.bench.run import main

sys.exit(main())
