"""``python -m bench`` from the root of a checkout: the same as ``lora-dist bench``;
``python -m bench tokenize``: the data start-up benchmark (:mod:`lora_dist.bench.tokenize`);
``python -m bench accuracy``: what a bf16 or NF4 base costs in accuracy (:mod:`lora_dist.bench.accuracy`);
``python -m bench checkpointing``: checkpointing every Nth block against none and every block
(:mod:`lora_dist.bench.checkpointing`).

The benchmark's code is :mod:`lora_dist.bench`; this folder holds its results (``bench/results/``).
"""

import sys

if sys.argv[1:2] == ["tokenize"]:
    from lora_dist.bench.tokenize import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ["checkpointing"]:
    from lora_dist.bench.checkpointing import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ["accuracy"]:
    from lora_dist.bench.accuracy import main

    sys.exit(main(sys.argv[2:]))

from lora_dist.bench.run import main

sys.exit(main())
