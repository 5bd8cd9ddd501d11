"""``python -m bench`` from the root of a checkout: the same as ``lora-dist bench``;
``python -m bench tokenize``: the data start-up benchmark (:mod:`lora_dist.bench.tokenize`).

The benchmark's code is :mod:`lora_dist.bench`; this folder holds its results (``bench/results/``).
"""

import sys

if sys.argv[1:2] == ["tokenize"]:
    from lora_dist.bench.tokenize import main

    sys.exit(main(sys.argv[2:]))

from lora_dist.bench.run import main

sys.exit(main())
