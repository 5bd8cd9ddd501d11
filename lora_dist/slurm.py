"""Render and submit the multi-node sbatch script behind ``lora-dist slurm``.

The script is ``slurm/multi_node.sbatch``: this module holds its text, and the
file in the repository is :func:`render_sbatch` with its defaults (a unit test
keeps the two identical; regenerate the file with ``python -m lora_dist.slurm
> slurm/multi_node.sbatch``). A rendered job differs from the file only in the
``#SBATCH`` header and in a few lines that fix the script's arguments (config
and overrides), exported variables and the virtual environment, all passed
through :func:`shlex.quote`.

Values that end up on ``#SBATCH`` lines are not shell-parsed by sbatch, so
they are validated instead of quoted: names, a Slurm time string, a log path
without whitespace, quotes or ``%``.

The argument parser of ``lora-dist slurm`` lives in :mod:`lora_dist.cli`,
which calls :func:`run_slurm`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from lora_dist.errors import ConfigError, UserError

__all__ = [
    "SITE_NETWORK_VARS",
    "SlurmError",
    "render_sbatch",
    "run_slurm",
    "submit",
]


class SlurmError(UserError, RuntimeError):
    """A Slurm job could not be rendered or submitted; the message says why."""


#: Network settings a site may need (docs/slurm.md, "Network"). :func:`run_slurm`
#: exports those set in the submitting environment in the rendered script.
SITE_NETWORK_VARS = (
    "SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "NCCL_IB_GID_INDEX",
    "NCCL_IB_DISABLE",
    "NCCL_DEBUG",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_BLOCKING_WAIT",
)

_HEADER = """\
#!/bin/bash
# Multi-node LoRA fine-tuning: one torchrun per node, static rendezvous on
# the first node of the allocation.
#
#   mkdir -p logs
#   sbatch [--nodes=N] [--gpus-per-node=G] slurm/multi_node.sbatch CONFIG.yaml [key.path=value ...]
#
# `lora-dist slurm CONFIG [overrides] --nodes N --gpus-per-node G [--env KEY=VALUE]`
# renders and submits this same script with the header and arguments filled in.
# Options given to sbatch on the command line override the #SBATCH lines.
#
# CPUs: --exclusive gives the job whole nodes; each node's torchrun task gets
# all the CPUs the job has there (--cpus-per-task=C, when given, caps that),
# unbound (--cpu-bind=none), and each worker OMP_NUM_THREADS = CPUs / workers.
#
# Environment knobs (sbatch passes your environment to the job):
#   TRAIN_CMD       command each worker runs, split on whitespace
#                   (default "lora-dist train"); the config and overrides follow it
#   NPROC_PER_NODE  workers per node (default: GPUs Slurm gave the job per node)
#   SOCKET_IFNAME   network interface for gloo/NCCL sockets: unset = their
#                   default; a name (ib0); "auto" = per node, the first of: an
#                   InfiniBand ib*, a Slingshot hsn*, a RoCE interface (an
#                   active RDMA port's netdev), else the one that reaches the
#                   first node; "route" = always the one that reaches the first
#                   node. Never lo, docker*, virbr*, veth*. NCCL_SOCKET_IFNAME /
#                   GLOO_SOCKET_IFNAME, when set, win for their library.
#   OMP_NUM_THREADS threads per worker (default: the node's CPUs / workers)
#   MASTER_PORT     rendezvous port (default: derived from the job id)
#   VENV            virtual environment to activate on the nodes
#
"""

_SITE_NETWORK = """\
# Site network settings (docs/slurm.md, "Network"): set them in the submitting
# environment (sbatch passes it on; `lora-dist slurm --env KEY=VALUE` writes
# them into the job it renders), or uncomment and edit here.
# export SOCKET_IFNAME=ib0                    # gloo and NCCL socket interface, or auto
# export NCCL_SOCKET_IFNAME=ib0               # NCCL bootstrap/TCP only (wins over SOCKET_IFNAME)
# export GLOO_SOCKET_IFNAME=ib0               # gloo only (wins over SOCKET_IFNAME)
# export NCCL_IB_HCA=mlx5_0,mlx5_1            # RDMA adapters NCCL may use (ibv_devices)
# export NCCL_IB_GID_INDEX=3                  # RoCE: the RoCE v2 IPv4 GID index (show_gids)
# export NCCL_IB_DISABLE=1                    # no InfiniBand/RoCE: NCCL over TCP sockets
# export NCCL_DEBUG=WARN                      # INFO once: logs the transport and NICs chosen
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a failed/timed-out collective ends the job (never 0)
# export TORCH_NCCL_BLOCKING_WAIT=1           # debugging hangs only: every wait blocks (slow)
"""

# Runs on every node (inside `srun bash -c '...'`, so no single quotes): turns
# SOCKET_IFNAME=auto|route into an interface name and exports the libraries'
# variables. slurm/per_gpu_tasks.sbatch and slurm/preemptible.sbatch hold the
# same text (a test keeps the copies identical).
IFNAME_BLOCK = r"""  if [ "$SOCKET_IFNAME" = auto ] || [ "$SOCKET_IFNAME" = route ]; then
    requested=$SOCKET_IFNAME
    SOCKET_IFNAME=
    # Candidates: up, with an IPv4 address; never loopback or container/VM links.
    candidates=()
    while read -r _ name _; do
      case "${name%%@*}" in
        lo | docker* | virbr* | veth* | cni* | flannel* | cali* | br-????????????) ;;
        *) candidates+=("${name%%@*}") ;;
      esac
    done < <(ip -o -4 addr show up)
    if [ "$requested" = auto ]; then
      # Netdevs of active RDMA ports: IPoIB and RoCE interfaces.
      rdma=" $(rdma link show 2>/dev/null | sed -n "s/.* state ACTIVE .* netdev \([^ ]*\).*/\1/p" | tr "\n" " ") "
      # InfiniBand first, then Slingshot, then RoCE.
      for kind in ib hsn rdma; do
        for name in "${candidates[@]}"; do
          case "$kind:$name" in
            ib:ib* | hsn:hsn*) SOCKET_IFNAME=$name ;;
            rdma:*) case "$rdma" in *" $name "*) SOCKET_IFNAME=$name ;; esac ;;
          esac
          if [ -n "$SOCKET_IFNAME" ]; then break 2; fi
        done
      done
    fi
    if [ -z "$SOCKET_IFNAME" ]; then
      master_ip=$(getent ahostsv4 "$MASTER_ADDR" | sed -n "1s/ .*//p")
      if [ -n "$master_ip" ]; then
        # On the first node: the interface holding its address; elsewhere:
        # the interface the route to it leaves through.
        read -r _ SOCKET_IFNAME _ < <(ip -o -4 addr show to "$master_ip")
        if [ -z "$SOCKET_IFNAME" ]; then
          SOCKET_IFNAME=$(ip -o -4 route get "$master_ip" | sed -n "s/.* dev \([^ ]*\).*/\1/p")
        fi
      fi
      case " ${candidates[*]} " in
        *" ${SOCKET_IFNAME:-?} "*) ;;
        *)
          echo "SOCKET_IFNAME=$requested on $SLURMD_NODENAME: no usable interface reaches $MASTER_ADDR" \
            "(found: ${SOCKET_IFNAME:-none}; never lo, docker*, virbr*, veth*); set SOCKET_IFNAME=<interface>" >&2
          exit 1
          ;;
      esac
    fi
    if [ "${SLURM_LOCALID:-0}" = 0 ]; then
      echo "$SLURMD_NODENAME: SOCKET_IFNAME=$requested -> $SOCKET_IFNAME" >&2
    fi
  fi
  if [ -n "$SOCKET_IFNAME" ]; then
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
  fi
"""

_BODY_HEAD = r"""
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
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
# CPUs for each node's torchrun and its workers: --cpus-per-task if given,
# else all the job has on its smallest node (SLURM_JOB_CPUS_PER_NODE, e.g.
# "128(x2),96": srun asks every node for as many, and a mixed partition's
# smaller node would refuse more). Without this the step gets one CPU and
# every worker shares it.
fewest_cpus() {
  local part fewest=""
  IFS=, read -r -a parts <<<"$1"
  for part in "${parts[@]}"; do
    part=${part%%(*}
    if [ -z "$fewest" ] || [ "$part" -lt "$fewest" ]; then fewest=$part; fi
  done
  echo "${fewest:-1}"
}
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-$(fewest_cpus "${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}")}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS_PER_NODE / NPROC_PER_NODE > 1 ? CPUS_PER_NODE / NPROC_PER_NODE : 1))}
export MASTER_ADDR MASTER_PORT SOCKET_IFNAME OMP_NUM_THREADS
read -r -a train_cmd <<<"$TRAIN_CMD"

echo "job $SLURM_JOB_ID: ${SLURM_NNODES} nodes x ${NPROC_PER_NODE} workers," \
  "${CPUS_PER_NODE} CPUs per node, OMP_NUM_THREADS=${OMP_NUM_THREADS}," \
  "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, command: ${train_cmd[*]} $*"

# One task per node. The single-quoted block runs on each node, so
# $SLURM_NODEID and the interface lookup are that node's own; the arguments
# after `bash` become its "$@" and are passed through untouched.
# shellcheck disable=SC2016
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task="$CPUS_PER_NODE" --cpu-bind=none bash -c '
"""

_BODY_TAIL = r"""  exec torchrun --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" "$@"
' bash \
  --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --no-python "${train_cmd[@]}" "$@"
"""

_BODY = _BODY_HEAD + IFNAME_BLOCK + _BODY_TAIL

_ARGS_COMMENT = "# What to run: set by `lora-dist slurm`.\n"
_ENV_COMMENT = "# Exported by `lora-dist slurm` (--env, or set when it ran).\n"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PARTITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(,[A-Za-z0-9][A-Za-z0-9._-]*)*")
# minutes | min:sec | h:min:sec | days-h | days-h:min | days-h:min:sec
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
_SBATCH_PATH = re.compile(r"[^\s'\"\\%#$`]+")
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=", re.DOTALL)
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SlurmError(message)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        _check(
            isinstance(key, str) and bool(_ENV_KEY.fullmatch(key)),
            f"invalid environment variable name {key!r}: use letters, digits and '_', e.g. --env NCCL_IB_HCA=mlx5_0",
        )
        _check(
            not key.startswith("SLURM_"),
            f"--env {key}: SLURM_* variables are set by Slurm itself; use the matching lora-dist slurm option",
        )
        _check(isinstance(value, str) and "\0" not in value, f"--env {key}: the value must be a string without NUL")


def render_sbatch(
    config: str | None = None,
    overrides: Sequence[str] = (),
    *,
    nodes: int = 2,
    gpus_per_node: int = 8,
    job_name: str = "lora-dist",
    partition: str | None = None,
    account: str | None = None,
    time: str | None = "04:00:00",
    log_dir: str = "logs",
    venv: str | None = None,
    cpus_per_task: int | None = None,
    env: Mapping[str, str] | None = None,
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
        cpus_per_task: CPUs for each node's torchrun and its workers
            (``#SBATCH --cpus-per-task``); ``None``: all CPUs of the node, which
            ``--exclusive`` gives the job.
        env: Variables the script exports before anything else (site network
            settings such as ``NCCL_IB_HCA``), values shell-quoted.

    Returns:
        The script text.

    Raises:
        SlurmError: if a value is invalid. Nothing user-supplied reaches the
            shell unquoted, and nothing reaches an ``#SBATCH`` line unvalidated.
    """
    _check(_positive_int(nodes), f"--nodes must be an integer >= 1, got {nodes!r}")
    _check(_positive_int(gpus_per_node), f"--gpus-per-node must be an integer >= 1, got {gpus_per_node!r}")
    _check(
        cpus_per_task is None or _positive_int(cpus_per_task),
        f"--cpus-per-task must be an integer >= 1, got {cpus_per_task!r}",
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
    env = dict(env or {})
    _check_env(env)

    directives = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus_per_node}",
        "--exclusive",
    ]
    if cpus_per_task is not None:
        directives.append(f"--cpus-per-task={cpus_per_task}")
    if partition is not None:
        directives.append(f"--partition={partition}")
    if account is not None:
        directives.append(f"--account={account}")
    if time is not None:
        directives.append(f"--time={time}")
    directives.append(f"--output={log_dir.rstrip('/') or '/'}/%x-%j.out")
    header = _HEADER + "".join(f"#SBATCH {d}\n" for d in directives) + "\n" + _SITE_NETWORK

    job_args = ""
    if env:
        job_args += "\n" + _ENV_COMMENT + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    if config is not None or venv is not None:
        job_args += "\n" + _ARGS_COMMENT
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
        detail = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())
        raise SlurmError(f"sbatch {path} failed (exit {proc.returncode}): {detail}")
    # --parsable prints "jobid" or "jobid;cluster".
    return proc.stdout.strip().split(";")[0]


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        _check(
            bool(sep) and bool(_ENV_KEY.fullmatch(key)),
            f"invalid --env {item!r}: expected KEY=VALUE with KEY a variable name, e.g. --env NCCL_IB_HCA=mlx5_0",
        )
        env[key] = value
    return env


def _check_config(config: str, overrides: list[str], world_size: int) -> None:
    """Refuse, at submit time, a config and overrides that ``lora-dist train`` would refuse on ``world_size`` ranks
    (an unknown key, an fsdp2 split that does not multiply to the ranks...)."""
    from lora_dist.config import load_config

    try:
        cfg = load_config(config, overrides)
        if cfg.parallel.strategy == "fsdp2":
            from lora_dist.parallel.parallelize import dp_mesh_shape

            dp_mesh_shape(cfg.parallel, world_size)
    except ConfigError as e:
        raise SlurmError(str(e)) from None


def run_slurm(
    config: str,
    overrides: list[str],
    *,
    nodes: int = 2,
    gpus_per_node: int = 8,
    partition: str | None = None,
    account: str | None = None,
    time: str = "04:00:00",
    job_name: str = "lora-dist",
    output_dir: str = "runs/slurm",
    dry_run: bool = False,
    env: list[str] | None = None,
    cpus_per_task: int | None = None,
) -> str:
    """Render the multi-node job for ``config`` and, unless ``dry_run``, submit it.

    The config is loaded with its overrides before anything is submitted, so
    what training would refuse fails here. The script fixes the config (made absolute), the overrides and the current
    virtual environment, and exports the :data:`SITE_NETWORK_VARS` set in this
    process's environment plus every ``env`` entry (``env`` wins).

    Args:
        config: Training config (YAML); must exist and load with ``overrides``.
        overrides: Dotted ``key.path=value`` config overrides (a leading ``--``
            is dropped).
        nodes: Number of nodes, one torchrun each.
        gpus_per_node: GPUs per node = workers per node.
        partition: Slurm partition, or ``None`` for the cluster default.
        account: Slurm account, or ``None``.
        time: Time limit in a Slurm format.
        job_name: Job name and log prefix.
        output_dir: Where the submitted script and ``logs/`` go.
        dry_run: Return the script instead of submitting it; writes nothing.
        env: ``KEY=VALUE`` strings the job exports (site network settings).
        cpus_per_task: CPUs per node for torchrun and its workers; ``None``:
            the whole node.

    Returns:
        The text to print: the script for a dry run, else a line naming the
        job id, the kept script and the log.

    Raises:
        SlurmError: bad input, a config or override ``lora-dist train`` would refuse (one line
            naming the problem and the fix), or sbatch missing or refusing the job.
    """
    overrides = list(overrides)
    if overrides[:1] == ["--"]:
        overrides = overrides[1:]
    unknown = [o for o in overrides if o.startswith("-")]
    _check(not unknown, f"unknown option(s) for lora-dist slurm: {' '.join(unknown)}; see lora-dist slurm --help")
    _check(
        isinstance(config, str) and os.path.isfile(config),
        f"config not found: {config}; give the path of a training config YAML",
    )
    output = Path(output_dir).resolve()
    _check(
        bool(_SBATCH_PATH.fullmatch(str(output))),
        f"invalid --output-dir {str(output)!r}: no whitespace, quotes, '%', '#', '$' or '`' "
        "(the log path goes on an #SBATCH line)",
    )
    exported = {k: os.environ[k] for k in SITE_NETWORK_VARS if os.environ.get(k)}
    exported.update(_parse_env(env or []))
    in_venv = sys.prefix != sys.base_prefix
    script = render_sbatch(
        os.path.abspath(config),
        overrides,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        job_name=job_name,
        partition=partition,
        account=account,
        time=time,
        log_dir=str(output / "logs"),
        venv=sys.prefix if in_venv else None,
        cpus_per_task=cpus_per_task,
        env=exported,
    )
    _check_config(config, overrides, nodes * gpus_per_node)
    if dry_run:
        return script
    (output / "logs").mkdir(parents=True, exist_ok=True)
    script_path = output / f"{job_name}-{datetime.now():%Y%m%d-%H%M%S}.sbatch"
    job_id = submit(script, script_path)
    return f"submitted job {job_id}: script {script_path}, log {output / 'logs'}/{job_name}-{job_id}.out\n"


if __name__ == "__main__":
    sys.stdout.write(render_sbatch())
