"""``lora-dist merge`` on 2 ranks whose default group times out after 2 s, rank 0's final fsync taking 6 s.

    python export_slow_sync.py WORK merge --base B --adapter A --out O ...   (under ranks / torchrun)

The command leaves the process with its exit code (``cli._shutdown``: the group was joined).
"""

from __future__ import annotations

import sys
import time

import torch.distributed as dist
from export_common import finish

from lora_dist import cli
from lora_dist.export import writer
from lora_dist.launch import init_distributed


def main() -> None:
    init_distributed(timeout_s=2)  # parallel.timeout_s=2; the merge command below keeps this group
    if dist.get_rank() == 0:
        real = writer._OpenFiles.close
        writer._OpenFiles.close = lambda self, sync=True: time.sleep(6) or real(self, sync)
    finish(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
    finish()
