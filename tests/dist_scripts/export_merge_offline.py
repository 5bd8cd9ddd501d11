"""``lora-dist merge`` under torchrun: the ranks split the offline merge.

    torchrun --nproc_per_node N export_merge_offline.py WORK merge --base B --adapter A --out O ...

Runs the merge subcommand through the CLI glue (which joins the torchrun
world itself) and records how many tensor bytes each rank wrote in
WORK/result_<rank>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from export_common import write_result, finish

from lora_dist import safetensors_writer
from lora_dist.export import add_merge_subparser


def main() -> None:
    work = Path(sys.argv[1])
    parser = argparse.ArgumentParser(prog="lora-dist")
    add_merge_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(sys.argv[2:])

    written = []
    real = safetensors_writer.pwrite_tensor

    def counting(fd, tensor, offset):
        written.append(tensor.numel() * tensor.element_size())
        real(fd, tensor, offset)

    safetensors_writer.pwrite_tensor = counting
    code = args.func(args)
    write_result(work / f"result_{os.environ['RANK']}.json", {"code": code, "bytes": sum(written)})
    finish(code)


if __name__ == "__main__":
    main()
    finish()
