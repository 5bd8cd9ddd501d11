"""``lora-dist bench``: command-line glue for the benchmark in the repository's ``bench/`` package.

The benchmark itself (configurations, measurement, report) lives in
``bench/`` next to the package, since it is run from a checkout rather than
shipped; see ``docs/bench.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_bench_subparser", "run_bench"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bench_run():
    if not (REPO_ROOT / "bench" / "run.py").is_file():
        raise SystemExit("lora-dist bench: needs a source checkout (bench/ next to lora_dist/); "
                         "run it from a clone of the repository")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench import run

    return run


def add_bench_subparser(subparsers) -> argparse.ArgumentParser:
    """``lora-dist bench [--quick] [--out DIR] [--sizes ...] [--configs ...]``."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark lora_dist fsdp2/zero3/ddp against PEFT + accelerate (FSDP2, ZeRO-3) and full fine-tuning",
        description="Run every configuration, one torchrun launch each, on Llama-shaped models; measure peak "
        "memory, step time, tokens/s, bytes communicated, merged export; check the targets; write results.json, "
        "results.md and PNG plots.",
    )
    if (REPO_ROOT / "bench" / "run.py").is_file():
        _bench_run().add_arguments(p)
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; returns 1 if a configuration failed to run (a FAILed target is a result, exit 0)."""
    run = _bench_run()
    results = run.run_bench(run.options_from_args(args))
    from bench.report import failed_configs

    return 1 if failed_configs(results) else 0
