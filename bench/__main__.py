"""``python -m bench``: the same as ``lora-dist bench``."""

import sys

from bench.run import main

sys.exit(main())
