"""``lora-dist merge`` under torchrun: the ranks split the offline merge.

    torchrun --nproc_per_node N export_merge_offline.py WORK merge --base B --adapter A --out O ...

Runs the merge command through ``lora_dist.cli.main`` (which joins the
torchrun world itself, and leaves it before returning) and records how many
tensor bytes each rank wrote in WORK/result_<rank>.json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from export_common import finish, write_result

from lora_dist import cli
from lora_dist.export import layout


def main() -> None:
    work = Path(sys.argv[1])
    written = []
    real = layout.pwrite_tensor

    def counting(fd, tensor, offset):
        written.append(tensor.numel() * tensor.element_size())
        real(fd, tensor, offset)

    layout.pwrite_tensor = counting
    code = cli.main(sys.argv[2:])
    write_result(work / f"result_{os.environ['RANK']}.json", {"code": code, "bytes": sum(written)})
    finish(code)


if __name__ == "__main__":
    main()
    finish()
