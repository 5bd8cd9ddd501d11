"""``lora-dist``: every command's parser, and one exit-code policy.

    lora-dist train CONFIG.yaml [section.key=value ...]   one process, or under torchrun/srun/mpirun
    lora-dist demo [--nproc 2] [--out runs/demo]          the README's end-to-end job
    lora-dist export RUN_DIR                              merged checkpoint from a finished run
    lora-dist eval CONFIG [--adapter DIR | --base-only]  validation loss and perplexity
    lora-dist plot RUN_DIR                                PNGs of the run's curves
    lora-dist generate --base DIR [--adapter DIR] --prompt TEXT
    lora-dist merge / verify / slurm / plan / bench       see each command's --help

Options and ``section.key=value`` overrides mix in any order. Exit codes:
0 done; 1 a check found a problem (``verify``); 2 bad input or environment,
reported as one line naming the problem and the fix. The commands' work lives
in their modules; this module parses, calls, and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lora_dist.errors import USER_ERRORS, UserError
from lora_dist.preemption import hold_stop_signals, release_stop_signals

__all__ = ["EXIT_CHECK_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
#: A check found a problem (``lora-dist verify``).
EXIT_CHECK_FAILED = 1
#: Bad input or environment: a one-line error naming the problem and the fix.
EXIT_USAGE = 2

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
_DTYPE_CHOICES = ["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]
_EXIT_CODES = ("exit codes: 0 done; 1 a check found a problem (verify) or a configuration failed to run (bench); "
               "2 bad input or environment (one line says why); 99 train stopped by a preemption signal (requeue it)")


@dataclass(frozen=True)
class Command:
    help: str
    parser: Callable[[str], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]


def _launch_rank() -> str:
    """This process's rank as :func:`lora_dist.launch.detect_launch_env` reads it (torchrun, then MPI, then srun);
    ``?`` where the launch variables do not add up (the command then says why)."""
    from lora_dist.launch import LaunchError, detect_launch_env

    try:
        return str(detect_launch_env().rank)
    except LaunchError:
        return "?"


def _setup_logging() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: CPU on purpose, not a failed GPU probe
    rank = _launch_rank()
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch.distributed", "DeepSpeed", "deepspeed", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers imports torchao when it is installed (model.quantize=nf4): its missing-kernel notices and
    # torch's pytree deprecations say nothing about the run.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _config_parser(prog: str, description: str, overrides_help: str) -> argparse.ArgumentParser:
    """A parser taking ``[CONFIG.yaml] [section.key=value ...]`` with the config keys in its help."""
    from lora_dist.config import config_help

    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any as section.key=value):\n" + config_help() + "\n\n" + _EXIT_CODES,
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional; defaults + overrides otherwise)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    return p


def _config_and_overrides(args: argparse.Namespace):
    """The run config of ``[CONFIG] [overrides]``; a first argument with ``=`` is an override, not a file, and
    the one YAML file among the overrides (``model.path=X CONFIG.yaml``) is the config, wherever it stands."""
    from lora_dist.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    files = [o for o in overrides if "=" not in o and o.endswith((".yaml", ".yml"))]
    if config is None and len(files) == 1:
        config = files[0]
        overrides.remove(config)
    return load_config(config, overrides)


def _size(text: str) -> str:
    from lora_dist.export.layout import parse_size

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# ----------------------------------------------------------------------------- train, demo, export


def _train_parser(prog: str) -> argparse.ArgumentParser:
    return _config_parser(prog, "Run a LoRA fine-tune. Works as one process and unchanged under torchrun, srun "
                          "and mpirun.", "dotted overrides, e.g. lora.r=16 train.lr=3e-4")


def _train(args: argparse.Namespace) -> int:
    from lora_dist.train import train

    result = train(_config_and_overrides(args))
    if int(os.environ.get("RANK", "0")) == 0:
        trained = (f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}" if result.history else
                   f"the run had trained all {result.steps} steps, nothing more to train")  # a finished run again
        print(f"done: {trained}" + (f", eval {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + f"; outputs in {result.output_dir}")
    return EXIT_OK


def _eval_parser(prog: str) -> argparse.ArgumentParser:
    p = _config_parser(prog, "Loss and perplexity of a run's adapter, or of the base, on the validation data "
                       "(data.eval_path, or the data.eval_fraction held out of data.path). Runs as training does: "
                       "one process, or under torchrun/srun/mpirun, sharded by parallel.strategy; every "
                       "validation block counts once, whatever the world size.",
                       "dotted overrides, e.g. output.dir=runs/x data.eval_path=val.jsonl")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", default=None, help="PEFT-format adapter dir (default: OUTPUT_DIR/adapter)")
    which.add_argument("--base-only", action="store_true", help="evaluate the base model, without an adapter")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _eval(args: argparse.Namespace) -> int:
    from lora_dist.evaluation import evaluate_run

    result = evaluate_run(_config_and_overrides(args), args.adapter, args.base_only)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.as_dict()) if args.json else
              f"eval {result.model}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
              f"({result.tokens} target tokens in {result.blocks} blocks)")
    return EXIT_OK


def _demo_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Build a tiny Llama checkpoint, fine-tune it with LoRA on "
                                "CPU processes (FSDP2 over gloo), write the merged export and check it.")
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    p.add_argument("--out", default="runs/demo", help="working dir (default runs/demo)")
    p.add_argument("overrides", nargs="*", help="extra config overrides")
    return p


def _demo(args: argparse.Namespace) -> int:
    from lora_dist.demo import run_demo

    if not DEMO_CONFIG.is_file():
        raise _UsageError(f"{DEMO_CONFIG} not found; the demo runs from a source checkout (configs/ next to "
                          "lora_dist/): clone the repository and `pip install -e .`")
    return run_demo(DEMO_CONFIG, Path(args.out), args.nproc, args.overrides)


def _export_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Write the merged checkpoint of a finished run from the "
                                "sharded state. Run it under the launcher of the training run (torchrun, srun, "
                                "mpirun), or as one process: then it streams the base from disk.")
    p.add_argument("run_dir", help="a run's output.dir (holds config.json and adapter/)")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/merged); never the base model, the "
                   "run's adapter/, checkpoints/ or config.json, nor a dir containing or inside one of them")
    p.add_argument("--dtype", default=None, choices=_DTYPE_CHOICES,
                   help="dtype of the floating tensors written (default: export.dtype of the run); a value that "
                   "overflows it (fp16: above 65504) is an error and nothing is written")
    p.add_argument("--max-shard-size", type=_size, default=None, help="largest output file, e.g. 5GB")
    p.add_argument("--dense", action="store_true", help="write a base stored as block-scaled FP8 dense too (by "
                   "default it is written as stored: each adapted weight merged and quantized again)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is "
                   "complete, only if it is a merged checkpoint lora_dist wrote (anything else is refused)")
    return p


def _export(args: argparse.Namespace) -> int:
    from lora_dist.session import export_run

    _written(export_run(args.run_dir, out=args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite, keep_fp8=False if args.dense else None))
    return EXIT_OK


def _written(out: Path) -> None:
    """Say, once (rank 0), where a merged checkpoint was written."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"merged checkpoint written to {out}")


# ----------------------------------------------------------------------------- merge, verify


def _merge_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Merge a PEFT-format LoRA adapter into a base Hugging Face "
                                "checkpoint, one tensor at a time. Under torchrun/srun/mpirun the ranks split the work.")
    p.add_argument("--base", required=True, help="base HF checkpoint dir (safetensors)")
    p.add_argument("--adapter", required=True, help="PEFT-format adapter dir")
    p.add_argument("--out", required=True, help="output checkpoint dir (must not exist unless --overwrite); never "
                   "--base or --adapter, nor a dir containing or inside one of them")
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="largest output file, decimal units like HF (default 5GB)")
    p.add_argument("--dense", action="store_true", help="write a base stored as block-scaled FP8 dense too (by "
                   "default it is written as stored: each adapted weight merged and quantized again)")
    p.add_argument("--dtype", default=None, choices=_DTYPE_CHOICES,
                   help="dtype of the floating tensors written (default: the base's); a value that overflows it "
                   "(fp16: above 65504) is an error and nothing is written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is "
                   "complete, only if it is a merged checkpoint lora_dist wrote (anything else is refused)")
    return p


def _merge(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from lora_dist.export import merge_offline
    from lora_dist.launch import destroy_distributed, detect_launch_env, init_distributed

    started = not dist.is_initialized() and detect_launch_env().distributed
    if started:
        init_distributed(backend="gloo")  # the merge is file work
    try:
        _written(merge_offline(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size,
                               dtype=args.dtype, overwrite=args.overwrite, keep_fp8=not args.dense))
        return EXIT_OK
    finally:
        if started:
            destroy_distributed()


def _verify_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, epilog=_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check a Hugging Face safetensors checkpoint dir.\n\n"
        "always:      the index names only files in the dir; every tensor is in exactly one file, where the index\n"
        "             says; total_size and every header match the files; every tensor is read: no NaN/Inf; at\n"
        "             least one tensor; the files' lora_dist metadata agree\n"
        "--base:      the same keys, shapes and config.json (but its dtype); each tensor in the dtype the export\n"
        "             writes; EVERY tensor the merge does not touch is bit-exact with the base (without\n"
        "             --adapter: a 2-D weight that differs is reported as not checked)\n"
        "--adapter:   every LoRA-targeted tensor is there; --sample of them, first layer to last, are recomputed\n"
        "             from base + adapter")
    p.add_argument("out_dir", help="checkpoint dir to check")
    p.add_argument("--base", default=None, help="base checkpoint dir it was made from")
    p.add_argument("--adapter", default=None, help="adapter dir it was merged with (needs --base)")
    p.add_argument("--sample", type=int, default=8,
                   help="how many of the LoRA-merged tensors to recompute from base + adapter, spread from the first "
                   "layer to the last (default 8; 0: none; -1: all). Only the merged tensors are sampled: every "
                   "other tensor is compared in full")
    return p


def _verify(args: argparse.Namespace) -> int:
    from lora_dist.export import VerifyError, verify_checkpoint

    if args.adapter is not None and args.base is None:
        raise _UsageError("--adapter needs --base: the merge is recomputed from the base and the adapter")
    sample = None if args.sample is not None and args.sample < 0 else args.sample
    try:
        report = verify_checkpoint(args.out_dir, args.base, args.adapter, sample=sample)
    except VerifyError as e:
        _error_line(f"lora-dist verify: FAILED: {e}")
        return EXIT_CHECK_FAILED
    print(report.summary())
    return EXIT_OK


# ----------------------------------------------------------------------------- slurm, plan, bench


def _data_parser(prog: str) -> argparse.ArgumentParser:
    p = _config_parser(prog, "Show what the model will see: records per format, packed blocks, tokens, the share "
                       "with a loss, documents split, and the first block with the text that carries no loss "
                       "marked [[like this]]. With --dump, write every block as JSON lines.",
                       "dotted overrides, e.g. data.path=chat.jsonl train.seq_len=2048")
    p.add_argument("--dump", default=None, metavar="OUT.jsonl",
                   help="write each block, in training order before shuffling: input_ids, labels (-100: no loss), "
                   "position_ids")
    p.add_argument("--limit", type=int, default=None, help="with --dump: at most this many blocks")
    return p


def _data(args: argparse.Namespace) -> int:
    from lora_dist.data import dump_blocks, summarize

    cfg = _config_and_overrides(args)
    if args.dump is None:
        print(summarize(cfg))
    else:
        print(f"wrote {dump_blocks(cfg, args.dump, args.limit)} blocks to {args.dump}", file=sys.stderr)
    return EXIT_OK


def _slurm_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Render slurm/multi_node.sbatch for CONFIG and submit it "
                                "with sbatch.", epilog=_EXIT_CODES)
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="config overrides key.path=value (a `--` before them is accepted)")
    p.add_argument("--nodes", type=int, default=2, help="number of nodes, one torchrun each (default 2)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = workers per node (default 8)")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--time", default="04:00:00", help="time limit, e.g. 04:00:00 or 1-00:00 (default 04:00:00)")
    p.add_argument("--job-name", default="lora-dist", help="job name and log prefix (default lora-dist)")
    p.add_argument("--output-dir", default="runs/slurm", help="where the rendered script and logs/ go")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per node for torchrun and its workers (default: the whole node, --exclusive)")
    p.add_argument("--env", action="append", default=None, metavar="KEY=VALUE",
                   help="export KEY=VALUE in the job (site network settings such as NCCL_SOCKET_IFNAME); repeatable")
    return p


def _slurm(args: argparse.Namespace) -> int:
    from lora_dist.slurm import run_slurm

    text = run_slurm(args.config, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     partition=args.partition, account=args.account, time=args.time, job_name=args.job_name,
                     output_dir=args.output_dir, dry_run=args.dry_run, env=args.env,
                     cpus_per_task=args.cpus_per_task)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def _plan_parser(prog: str) -> argparse.ArgumentParser:
    p = _config_parser(prog, "Predict per-rank memory (base shard, LoRA params, grads, optimizer state, "
                       "activations, gathered weights, buffers) of training CONFIG on W ranks. Reads only the "
                       "checkpoint's config.json. With parallel.strategy=auto, first the strategy chosen for "
                       "parallel.memory_gb per rank and each candidate's predicted peak.", "dotted overrides, e.g. parallel.strategy=zero3 train.seq_len=2048")
    p.add_argument("--world-size", "-W", type=int, required=True, help="number of ranks")
    p.add_argument("--ranks-per-node", "--gpus-per-node", type=int, default=None,
                   help="ranks (GPUs) per node, what parallel.reshard_after_forward=node keeps a shard over (default: "
                   "W up to 8, else the largest count dividing W and 8)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _plan(args: argparse.Namespace) -> int:
    from lora_dist.plan import plan_memory

    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise _UsageError(f"--ranks-per-node must be >= 1, got {args.ranks_per_node}")
    plan = plan_memory(_config_and_overrides(args), args.world_size, ranks_per_node=args.ranks_per_node)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.table())
    return EXIT_OK


def _bench_parser(prog: str) -> argparse.ArgumentParser:
    from lora_dist.bench.run import add_arguments

    p = argparse.ArgumentParser(prog=prog, description="Run every configuration, one torchrun launch each, on "
                                "Llama-shaped models; measure peak memory, step time, tokens/s, bytes communicated, "
                                "merged export; check the targets; write results.json, results.md and PNG plots.")
    add_arguments(p)
    return p


def _bench(args: argparse.Namespace) -> int:
    """Exit 1 if a configuration failed to run (a FAILed target is a result, exit 0)."""
    for extra in ("matplotlib", "peft"):
        try:
            __import__(extra)
        except ModuleNotFoundError:
            raise _UsageError(f"the benchmark needs {extra}: pip install 'lora_dist[bench]'") from None
    from lora_dist.bench.report import failed_configs
    from lora_dist.bench.run import options_from_args, run_bench

    return EXIT_CHECK_FAILED if failed_configs(run_bench(options_from_args(args))) else EXIT_OK


# ----------------------------------------------------------------------------- plot, generate


def _plot_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Draw a run's curves from its metrics.jsonl: loss and eval "
                                "loss, learning rate, throughput and memory against step, as PNGs in RUN_DIR/plots "
                                "(works while the run trains).")
    p.add_argument("run_dir", help="a run's output.dir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    return p


def _plot(args: argparse.Namespace) -> int:
    from lora_dist.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return EXIT_OK


def _generate_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate a reply from a base checkpoint, with a LoRA "
                                "adapter applied (unmerged), or from a merged checkpoint. The prompt goes through "
                                "the chat template training used, as training rendered it, and decoding stops at "
                                "the end-of-turn token it taught. Greedy by default: deterministic, and base + "
                                "adapter gives the same text as the merged checkpoint.")
    p.add_argument("--base", required=True, help="local HF checkpoint dir (a base model or a merged export)")
    p.add_argument("--adapter", default=None, help="PEFT-format adapter dir, e.g. RUN_DIR/adapter")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", default=None, help="the user's message (raw text for a model without a template)")
    what.add_argument("--messages", default=None, metavar="FILE",
                      help='a JSON conversation: [{"role": "system"|"user"|"assistant", "content": ...}, ...]')
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampled")
    p.add_argument("--top-k", type=int, default=None, help="sampling: keep the K likeliest tokens (0: no cut); "
                   "default: the model's generation_config, else 50")
    p.add_argument("--top-p", type=float, default=None, help="sampling: keep the likeliest tokens holding P of the "
                   "probability; default: the model's generation_config, else 1.0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat-template", default="", help="chatml, llama3, a Jinja file, or none (the raw prompt, as "
                   "text and string prompt/completion records are trained); default: the adapter's "
                   "chat_template.jinja, else the tokenizer's own")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: the GPU if there is one)")
    return p


def _generate(args: argparse.Namespace) -> int:
    from lora_dist.generate import generate, load_messages

    result = generate(args.base, args.adapter, prompt=args.prompt,
                      messages=load_messages(args.messages) if args.messages else None,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, chat_template=args.chat_template, device=args.device)
    print(result.text)
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "train": Command("run a LoRA fine-tune", _train_parser, _train),
    "demo": Command("build a tiny Llama, fine-tune it on 2 CPU processes, export merged", _demo_parser, _demo),
    "eval": Command("loss and perplexity of a run's adapter (or the base) on the validation data", _eval_parser,
                    _eval),
    "data": Command("show (or --dump) the training blocks a config makes from its data", _data_parser, _data),
    "export": Command("write the merged checkpoint of a finished run, sharded like training", _export_parser, _export),
    "merge": Command("merge a PEFT-format LoRA adapter into a base checkpoint (streaming, no full load)",
                     _merge_parser, _merge),
    "verify": Command("check a merged checkpoint dir (index, headers, NaN/Inf; optionally against base + adapter)",
                      _verify_parser, _verify),
    "slurm": Command("render (and submit) a multi-node sbatch job", _slurm_parser, _slurm),
    "plan": Command("predict per-rank memory of a run from config.json, before launching it", _plan_parser, _plan),
    "plot": Command("draw a run's loss, eval loss, lr, throughput and memory as PNGs", _plot_parser, _plot),
    "generate": Command("try a model: base (+ adapter) or merged checkpoint, on a prompt or a conversation",
                        _generate_parser, _generate),
    "bench": Command("benchmark lora_dist fsdp2/zero3/ddp against PEFT + accelerate (FSDP2, ZeRO-3) and full "
                     "fine-tuning", _bench_parser, _bench),
}


class _UsageError(UserError, ValueError):
    """Bad input found by the CLI itself."""


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="lora-dist", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="lora-dist COMMAND [options and section.key=value overrides, in any order]",
        description="Distributed LoRA fine-tuning: frozen base sharded (FSDP2 / ZeRO-3), LoRA replicated, "
        "merged export from the sharded state.\n\ncommands:\n" + listing,
        epilog="Training is configured by a YAML file plus dotted overrides (section.key=value, e.g. lora.r=16 "
        "train.lr=3e-4); `lora-dist train --help` lists every key with its default and meaning. "
        "`lora-dist COMMAND --help` describes a command.\n\n" + _EXIT_CODES,
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``lora-dist`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # a stop signal from now on reaches the run's handlers (nothing has loaded torch yet)
        hold_stop_signals()
    try:
        return _run_command(argv)
    finally:
        release_stop_signals()  # a hold no run took over (the command ended before training): the handlers found


def _run_command(argv: list[str]) -> int:
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return EXIT_OK if argv else EXIT_USAGE
    top.parse_args(argv[:1])  # an unknown command: argparse's message, exit 2
    name = argv[0]
    command = COMMANDS[name]
    _setup_logging()
    rest = argv[1:]
    if name == "slurm" and "--" in rest:  # the old `CONFIG [options] -- overrides` form
        cut = rest.index("--")
        rest = rest[:cut] + rest[cut + 1 :]
    args = command.parser(f"lora-dist {name}").parse_intermixed_args(rest)
    try:
        code = command.run(args)
    except USER_ERRORS as e:
        _error_line(f"lora-dist {name}: error: {_one_line(e)}")
        code = EXIT_USAGE
    except SystemExit as e:  # preemption: checkpoint written (or none to write), exit code asks for a requeue
        code = e.code if isinstance(e.code, int) else EXIT_CHECK_FAILED
        from lora_dist.preemption import Preempted

        if isinstance(e, Preempted):
            _leave_preempted(code, e.before_training)
    _shutdown(code)
    return code


def _leave_preempted(code: int, before_training: bool) -> None:
    """A preempted run's exit code is decided: where the process leaves through ``os._exit`` (it joined a group), a
    later stop signal must not turn it into 143 during the teardown, and a rank stopped before training skips the
    teardown (a wait for another rank may be in flight). A process that never joined a group returns from ``main``
    (a caller's, in-process) with its handlers as they were."""
    import torch.distributed as dist

    from lora_dist.launch import exit_distributed
    from lora_dist.preemption import ignore_stop_signals

    if not (dist.is_available() and dist.is_initialized()):
        return
    ignore_stop_signals()
    if before_training:
        exit_distributed(code, destroy=False)


def _error_line(text: str) -> None:
    """``text`` and its newline to stderr in one write: ranks sharing a terminal or a log file (torchrun's, srun's)
    each print theirs whole (``print`` writes the newline apart, and two ranks' lines ran together)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split("\n"))
    return text if len(text) <= 2000 else text[:1997] + "..."


def _shutdown(code: int) -> None:
    """Leave a distributed run without interpreter teardown (:func:`lora_dist.launch.exit_distributed`); one
    process that never joined a group returns to ``main``."""
    import torch.distributed as dist

    from lora_dist.launch import destroy_distributed, exit_distributed

    if dist.is_available() and dist.is_initialized():
        exit_distributed(code)
    destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
