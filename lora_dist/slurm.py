"""Render and submit the multi-node sbatch script behind ``lora-dist slurm``.

The script is ``slurm/multi_node.sbatch``: this module holds its text, and the
file in the repository is :func:`render_sbatch` with its defaults (a unit test
keeps the two identical; regenerate the file with ``python -m lora_dist.slurm
> slurm/multi_node.sbatch``). A rendered job differs from the file only in the
``#SBATCH`` header and in a few lines that fix the script's arguments (config
and overrides) and the virtual environment, all passed through
:func:`shlex.quote`.

Values that end up on ``#SBATCH`` lines are not shell-parsed by sbatch, so
they are validated instead of quoted: names, a Slurm time string, a log path
without whitespace, quotes or ``%``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

__all__ = [
    "SlurmError",
    "add_slurm_subparser",
    "render_sbatch",
    "run_slurm_command",
    "submit",
]


class SlurmError(RuntimeError):
    """A Slurm job could not be rendered or submitted; the message says why."""


_HEADER = """\
#!/bin/bash
# Multi-node LoRA fine-tuning: one torchrun per node, static rendezvous on
# the first node of the allocation.
#
#   mkdir -p logs
#   sbatch [--nodes=N] [--gpus-per-node=G] slurm/multi_node.sbatch CONFIG.yaml [key.path=value ...]
#
# `lora-dist slurm CONFIG --nodes N --gpus-per-node G [-- overrides]` renders
# and submits this same script with the header and arguments filled in.
# Options given to sbatch on the command line override the #SBATCH lines.
#
# Environment knobs (sbatch passes your environment to the job):
#   TRAIN_CMD       command each worker runs, split on whitespace
#                   (default "lora-dist train"); the config and overrides follow it
#   NPROC_PER_NODE  workers per node (default: GPUs Slurm gave the job per node)
#   SOCKET_IFNAME   network interface for gloo/NCCL: unset = their default,
#                   a name (ib0), or "auto" = the interface each node uses to
#                   reach the first node (interface names differ per node)
#   MASTER_PORT     rendezvous port (default: derived from the job id)
#   VENV            virtual environment to activate on the nodes
#
"""

_BODY = r"""
set -euo pipefail

TRAIN_CMD=${TRAIN_CMD:-lora-dist train}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
SOCKET_IFNAME=${SOCKET_IFNAME:-}
if [ -n "${VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
if [ $# -lt 1 ]; then
  echo "usage: sbatch multi_node.sbatch CONFIG.yaml [key.path=value ...]" >&2
  exit 2
fi

# Rendezvous on the first node. Its NodeAddr, not its name: node names need
# not resolve (on the local test cluster they are n1, n2 at 10.77.0.1x).
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=$(scontrol show node "${nodes[0]}" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
# One port per job, so two jobs sharing a node do not collide.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
export MASTER_ADDR MASTER_PORT SOCKET_IFNAME
read -r -a train_cmd <<<"$TRAIN_CMD"

echo "job $SLURM_JOB_ID: ${SLURM_NNODES} nodes x ${NPROC_PER_NODE} workers," \
  "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, command: ${train_cmd[*]} $*"

# One task per node. The single-quoted block runs on each node, so
# $SLURM_NODEID and the interface lookup are that node's own; the arguments
# after `bash` become its "$@" and are passed through untouched.
# shellcheck disable=SC2016
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  if [ "$SOCKET_IFNAME" = auto ]; then
    master_ip=$(getent ahostsv4 "$MASTER_ADDR" | sed -n "1s/ .*//p")
    # On the first node: the interface holding its address; elsewhere: the
    # interface the route to it leaves through.
    read -r _ SOCKET_IFNAME _ < <(ip -o -4 addr show to "$master_ip")
    if [ -z "$SOCKET_IFNAME" ]; then
      SOCKET_IFNAME=$(ip -o -4 route get "$master_ip" | sed -n "s/.* dev \([^ ]*\).*/\1/p")
    fi
    if [ -z "$SOCKET_IFNAME" ]; then
      echo "SOCKET_IFNAME=auto: no interface reaches $MASTER_ADDR from $SLURMD_NODENAME" >&2
      exit 1
    fi
  fi
  if [ -n "$SOCKET_IFNAME" ]; then
    export GLOO_SOCKET_IFNAME=$SOCKET_IFNAME NCCL_SOCKET_IFNAME=$SOCKET_IFNAME
  fi
  exec torchrun --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" "$@"
' bash \
  --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --no-python "${train_cmd[@]}" "$@"
"""

_ARGS_COMMENT = "# What to run: set by `lora-dist slurm`.\n"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PARTITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(,[A-Za-z0-9][A-Za-z0-9._-]*)*")
# minutes | min:sec | h:min:sec | days-h | days-h:min | days-h:min:sec
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
_SBATCH_PATH = re.compile(r"[^\s'\"\\%#$`]+")
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=", re.DOTALL)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SlurmError(message)


def render_sbatch(
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    nodes: int = 2,
    gpus_per_node: int = 8,
    job_name: str = "lora-dist",
    partition: str | None = None,
    account: str | None = None,
    time: str | None = "04:00:00",
    log_dir: str = "logs",
    venv: str | None = None,
) -> str:
    """Render the multi-node sbatch script.

    Args:
        config: Training config passed to ``lora-dist train``. ``None`` renders
            the generic script that takes the config as its first argument
            (``slurm/multi_node.sbatch``).
        overrides: Dotted ``key.path=value`` overrides appended after the config.
        nodes: Number of nodes (one torchrun each), >= 1.
        gpus_per_node: GPUs requested per node; torchrun starts one worker per GPU.
        job_name: Slurm job name, also the log file prefix.
        partition: Slurm partition (comma-separated list allowed).
        account: Slurm account to charge.
        time: Time limit in a Slurm format (``MM``, ``HH:MM:SS``, ``D-HH:MM``, ...).
        log_dir: Directory for ``<job_name>-<job_id>.out``; must exist at submit time.
        venv: Virtual environment the job activates on each node.

    Returns:
        The script text.

    Raises:
        SlurmError: if a value is invalid. Nothing user-supplied reaches the
            shell unquoted, and nothing reaches an ``#SBATCH`` line unvalidated.
    """
    _check(isinstance(nodes, int) and nodes >= 1, f"--nodes must be an integer >= 1, got {nodes!r}")
    _check(
        isinstance(gpus_per_node, int) and gpus_per_node >= 1,
        f"--gpus-per-node must be an integer >= 1, got {gpus_per_node!r}",
    )
    _check(bool(_NAME.fullmatch(job_name)), f"invalid job name {job_name!r}: use letters, digits, '.', '_', '-'")
    _check(
        partition is None or bool(_PARTITION.fullmatch(partition)),
        f"invalid partition {partition!r}: use letters, digits, '.', '_', '-' (comma-separated for several)",
    )
    _check(account is None or bool(_NAME.fullmatch(account)), f"invalid account {account!r}: use letters, digits, '.', '_', '-'")
    _check(
        time is None or bool(_TIME.fullmatch(time)),
        f"invalid time limit {time!r}: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
    )
    _check(
        bool(_SBATCH_PATH.fullmatch(log_dir)),
        f"invalid log directory {log_dir!r}: no whitespace, quotes, '%', '#', '$' or '`' (it goes on an #SBATCH line)",
    )
    if config is None:
        _check(not overrides, "overrides need a config")
    else:
        _check(bool(config) and "\0" not in config, "the config path must be a non-empty string")
    for override in overrides:
        _check(
            bool(_OVERRIDE.match(override)) and "\0" not in override,
            f"invalid override {override!r}: expected key.path=value",
        )

    directives = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus_per_node}",
        "--exclusive",
    ]
    if partition is not None:
        directives.append(f"--partition={partition}")
    if account is not None:
        directives.append(f"--account={account}")
    if time is not None:
        directives.append(f"--time={time}")
    directives.append(f"--output={log_dir.rstrip('/') or '/'}/%x-%j.out")
    header = _HEADER + "".join(f"#SBATCH {d}\n" for d in directives)

    job_args = ""
    if config is not None or venv is not None:
        job_args = "\n" + _ARGS_COMMENT
        if config is not None:
            job_args += "set -- " + " ".join(shlex.quote(a) for a in [config, *overrides]) + "\n"
        if venv is not None:
            job_args += f"VENV=${{VENV:-{shlex.quote(venv)}}}\n"
    return header + job_args + _BODY


def submit(script: str, script_path: str | os.PathLike[str]) -> str:
    """Write ``script`` to ``script_path`` and submit it with ``sbatch``.

    Args:
        script: Text from :func:`render_sbatch`.
        script_path: Where to keep the submitted script (parents are created).

    Returns:
        The job id sbatch printed.

    Raises:
        SlurmError: if ``sbatch`` is not on PATH or rejects the job.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            "sbatch not found on PATH: submit from a Slurm login node, or use --dry-run to print the script"
        )
    path = Path(script_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {path} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    # --parsable prints "jobid" or "jobid;cluster".
    return proc.stdout.strip().split(";")[0]


def _add_options(parser: argparse.ArgumentParser, suppress_defaults: bool = False) -> None:
    def default(value):
        return argparse.SUPPRESS if suppress_defaults else value

    parser.add_argument("--nodes", type=int, default=default(2), help="number of nodes, one torchrun each (default 2)")
    parser.add_argument("--gpus-per-node", type=int, default=default(8), help="GPUs per node = workers per node (default 8)")
    parser.add_argument("--partition", default=default(None), help="Slurm partition")
    parser.add_argument("--account", default=default(None), help="Slurm account")
    parser.add_argument("--time", default=default("04:00:00"), help="time limit, e.g. 04:00:00 or 1-00:00 (default 04:00:00)")
    parser.add_argument("--job-name", default=default("lora-dist"), help="job name and log prefix (default lora-dist)")
    parser.add_argument(
        "--output-dir",
        default=default("runs/slurm"),
        help="where the rendered script and logs/ go (default runs/slurm)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", default=default(False), help="print the script instead of submitting it"
    )


def add_slurm_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``lora-dist slurm`` to the CLI's subparsers.

    Usage: ``lora-dist slurm CONFIG --nodes N --gpus-per-node G [--partition P]
    [--time T] [--account A] [--dry-run] [-- key.path=value ...]``.
    Dispatch the parsed namespace to :func:`run_slurm_command`.
    """
    parser = subparsers.add_parser(
        "slurm",
        help="render (and submit) a multi-node sbatch job",
        description="Render slurm/multi_node.sbatch for CONFIG and submit it with sbatch.",
    )
    parser.add_argument("config", help="training config (YAML)")
    _add_options(parser)
    # argparse cannot take options after a positional and then `-- overrides`
    # with a plain nargs="*"; the remainder is split in run_slurm_command.
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- key.path=value ... (config overrides)")
    parser.set_defaults(func=run_slurm_command)
    return parser


def _split_remainder(args: argparse.Namespace) -> argparse.Namespace:
    """Parse options that followed CONFIG and separate the overrides after ``--``."""
    tokens = list(args.overrides or [])
    if "--" in tokens:
        cut = tokens.index("--")
        head, overrides = tokens[:cut], tokens[cut + 1 :]
    else:
        head, overrides = tokens, []
    options = argparse.ArgumentParser(prog="lora-dist slurm", add_help=False)
    _add_options(options, suppress_defaults=True)
    late, rest = options.parse_known_args(head)
    unknown = [t for t in rest if t.startswith("-")]
    if unknown:
        raise SlurmError(f"unknown option(s) for lora-dist slurm: {' '.join(unknown)}")
    merged = argparse.Namespace(**vars(args))
    for key, value in vars(late).items():
        setattr(merged, key, value)
    merged.overrides = rest + overrides
    return merged


def run_slurm_command(args: argparse.Namespace) -> int:
    """Run ``lora-dist slurm`` from parsed arguments; returns the exit code."""
    try:
        args = _split_remainder(args)
        config = os.path.abspath(args.config)
        if not os.path.isfile(config):
            raise SlurmError(f"config not found: {args.config}")
        output_dir = Path(args.output_dir).resolve()
        in_venv = sys.prefix != sys.base_prefix
        script = render_sbatch(
            config,
            args.overrides,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            job_name=args.job_name,
            partition=args.partition,
            account=args.account,
            time=args.time,
            log_dir=str(output_dir / "logs"),
            venv=sys.prefix if in_venv else None,
        )
        if args.dry_run:
            sys.stdout.write(script)
            return 0
        (output_dir / "logs").mkdir(parents=True, exist_ok=True)
        script_path = output_dir / f"{args.job_name}-{datetime.now():%Y%m%d-%H%M%S}.sbatch"
        job_id = submit(script, script_path)
    except SlurmError as err:
        print(f"lora-dist slurm: error: {err}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}: script {script_path}, log {output_dir / 'logs'}/{args.job_name}-{job_id}.out")
    return 0


if __name__ == "__main__":
    sys.stdout.write(render_sbatch())
