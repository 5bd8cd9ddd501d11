"""``lora-dist`` command line.

    lora-dist train CONFIG.yaml [section.key=value ...]   one process, or under torchrun/srun/mpirun
    lora-dist demo [--nproc 2] [--out runs/demo]          the README's end-to-end job
    lora-dist export RUN_DIR                               merged checkpoint from a finished run
    lora-dist merge / verify / slurm / plan / bench        see each command's --help
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _setup_logging() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: CPU on purpose, not a failed GPU probe
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("PMI_RANK", "0")))
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch.distributed", "DeepSpeed", "deepspeed", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train_parser(sub) -> None:
    from lora_dist.config import config_help

    p = sub.add_parser(
        "train",
        help="run a LoRA fine-tune",
        description="Run a LoRA fine-tune. Works as one process and unchanged under torchrun, srun and mpirun.",
        epilog="config keys (override any as section.key=value):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional; defaults + overrides otherwise)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=3e-4")


def _cmd_train(args) -> int:
    from lora_dist.config import load_config
    from lora_dist.train import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: loss {result.first_loss:.4f} -> {result.final_loss:.4f}"
              + (f", eval {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + f"; outputs in {result.output_dir}")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build a tiny Llama, fine-tune it on 2 CPU processes, export merged")
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    p.add_argument("--out", default="runs/demo", help="working dir (default runs/demo)")
    p.add_argument("overrides", nargs="*", help="extra config overrides")


def _cmd_demo(args) -> int:
    import shutil
    import socket

    from lora_dist.demo import make_tiny_checkpoint, write_demo_data

    if not DEMO_CONFIG.is_file():
        print(f"lora-dist demo: error: {DEMO_CONFIG} not found; the demo runs from a source checkout "
              "(configs/ next to lora_dist/): clone the repository and `pip install -e .`", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    base, data, run = out / "base", out / "data.jsonl", out / "run"
    if not (base / "config.json").is_file():
        print(f"building a tiny Llama checkpoint in {base}")
        make_tiny_checkpoint(base, arch="llama", hidden=128, layers=4, heads=4)
    write_demo_data(data, n=600)
    if run.exists():
        shutil.rmtree(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", f"--master_port={port}",
           "-m", "lora_dist.cli", "train", str(DEMO_CONFIG),
           f"model.path={base}", f"data.path={data}", f"output.dir={run}", *args.overrides]
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = subprocess.call(cmd, env=env)
    if code != 0:
        return code
    return _check_demo(base, run)


class DemoFailed(RuntimeError):
    """The demo ran but its result is not what it promises."""


def _check_demo(base: Path, run: Path) -> int:
    """The demo's promises: the loss went down, and the merged export equals base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapter
    from lora_dist.export import verify_checkpoint

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    if not min(losses[-3:]) < losses[0] - 0.5:
        raise DemoFailed(f"the training loss did not go down ({losses[0]:.3f} -> {losses[-1]:.3f})")
    if not (run / "merged" / "model.safetensors.index.json").is_file():
        raise DemoFailed(f"no merged export in {run / 'merged'} (export.merged was turned off?)")
    report = verify_checkpoint(run / "merged", base_dir=base, adapter_dir=run / "adapter")
    print(f"verified {report.summary()}")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    lora = load_adapter(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - lora(input_ids=ids).logits).abs().max().item()
    print(f"merged checkpoint loads with transformers; max |logits - (base + adapter) logits| = {diff:.2e}")
    if not diff < 1e-4:
        raise DemoFailed(f"the merged checkpoint's logits differ from base + adapter by {diff:.2e}")
    print(f"demo OK; outputs in {run}")
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write the merged checkpoint of a finished run, sharded like training")
    p.add_argument("run_dir", help="a run's output.dir (holds config.json and adapter/)")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/merged)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                   help="dtype of the floating tensors written (default: export.dtype of the run)")
    p.add_argument("--max-shard-size", default=None)
    p.add_argument("--overwrite", action="store_true")


def _cmd_export(args) -> int:
    from lora_dist.run_export import export_run

    export_run(args.run_dir, out=args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
               overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-dist",
        description="Distributed LoRA fine-tuning: frozen base sharded (FSDP2 / ZeRO-3), LoRA replicated, "
        "merged export from the sharded state.",
        epilog="Training is configured by a YAML file plus dotted overrides (section.key=value, e.g. lora.r=16 "
        "train.lr=3e-4); `lora-dist train --help` lists every key with its default and meaning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _demo_parser(sub)
    _export_parser(sub)
    for module, adders in (
        ("lora_dist.export", ("add_merge_subparser", "add_verify_subparser")),
        ("lora_dist.slurm", ("add_slurm_subparser",)),
        ("lora_dist.plan", ("add_plan_subparser",)),
        ("lora_dist.bench", ("add_bench_subparser",)),
    ):
        mod = __import__(module, fromlist=list(adders))
        for name in adders:
            getattr(mod, name)(sub)
    return parser


_COMMANDS = {"train": _cmd_train, "demo": _cmd_demo, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    from lora_dist.errors import USER_ERRORS

    try:
        if args.command in _COMMANDS:
            code = _COMMANDS[args.command](args)
        else:
            code = int(args.func(args) or 0)
    except (*USER_ERRORS, DemoFailed) as e:
        print(f"lora-dist {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except SystemExit as e:  # preemption: checkpoint written, exit code asks for a requeue
        code = e.code if isinstance(e.code, int) else 1
    _shutdown(code)
    return code


def _shutdown(code: int) -> None:
    """Leave a distributed run without interpreter teardown.

    All outputs are written, fsynced and barrier-synchronized by now. Under load,
    C++ threads of process groups still referenced by FSDP meshes could abort the
    interpreter's teardown ("terminate called without an active exception") and
    turn a finished run into a failed one, so a rank that joined a process group
    destroys it and exits straight away with the command's exit code.
    """
    import torch.distributed as dist

    from lora_dist.launch import destroy_distributed

    was_distributed = dist.is_available() and dist.is_initialized()
    destroy_distributed()
    if was_distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
