"""Launch-environment detection and ``torch.distributed`` initialization.

Every launcher lora_dist supports ends up here: ``torchrun`` (also what
``accelerate launch`` and the DeepSpeed launcher look like: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...), Slurm ``srun`` tasks
(``SLURM_PROCID``, ...), MPI (Open MPI ``OMPI_COMM_WORLD_*``, MPICH/Intel MPI
Hydra ``PMI_*``/``MPI_LOCAL*``) and a plain single process.

Precedence when several sets of variables are present:

1. torchrun-style variables (``RANK``/``WORLD_SIZE``): torchrun inside an
   ``srun`` task is the normal multi-node recipe.
2. MPI variables, unless they agree with the ``srun`` task variables (``srun
   --mpi=pmi2`` sets ``PMI_RANK`` equal to ``SLURM_PROCID``; then Slurm wins
   and mpi4py is not needed). ``mpirun`` inside an allocation starts its
   daemons with ``srun``, so its ranks carry Slurm variables that disagree.
3. Slurm ``srun`` tasks (``SLURM_PROCID`` plus a step id). The batch shell of
   ``sbatch`` (or an ``salloc`` shell) is not an ``srun`` task and counts as a
   single process; with ``allow_batch_shell=False`` (``lora-dist train``) such a
   shell in an allocation of more than one task is a ``LaunchError`` instead,
   because training there would use one process of the whole allocation.
4. A single process.

``detect_launch_env`` only reads a mapping. ``init_distributed`` detects,
bootstraps what the launcher does not provide (MPI: rank 0 picks the master
address and port and broadcasts them with mpi4py), creates the rendezvous
store itself so that a missing rank or a busy port becomes a one-line
``LaunchError``, initializes the default process group and exports
torchrun-style variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) for libraries such as
DeepSpeed that read them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta

__all__ = [
    "LaunchEnv",
    "LaunchError",
    "detect_launch_env",
    "destroy_distributed",
    "expand_hostlist",
    "init_distributed",
]

UNKNOWN = -1
"""Value of a ``LaunchEnv`` count the launcher does not provide; filled in by
``init_distributed`` (MPI without local-rank variables)."""

_BATCH_STEP_IDS = {"batch", "extern", "interactive", "4294967291", "4294967292", "4294967293",
                   "4294967294", "4294967295"}
_EXPORTED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_JOIN_POLL_S = 0.02

_active_env: LaunchEnv | None = None
_saved_environ: dict[str, str | None] = {}


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher describes it.

    ``master_addr``/``master_port`` are the rendezvous (TCP store) endpoint.
    Counts the launcher leaves open are ``UNKNOWN`` (-1) in the result of
    ``detect_launch_env`` and always filled in by ``init_distributed``; an
    empty ``master_addr`` / zero ``master_port`` likewise mean "chosen at
    init".
    """

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


class LaunchError(RuntimeError):
    """The launch environment is inconsistent or a rank cannot rendezvous.

    The message is one line naming the cause and the fix.
    """


def detect_launch_env(environ: Mapping[str, str] | None = None, *, allow_batch_shell: bool = True) -> LaunchEnv:
    """Describes the launch from environment variables alone.

    A pure function of ``environ`` apart from resolving the master host name
    to reject loopback masters in multi-node jobs.

    Args:
        environ: Variables to read; ``os.environ`` when None.
        allow_batch_shell: When False, the shell of a Slurm allocation
            (``sbatch`` batch script or ``salloc``: ``SLURM_JOB_ID`` but no
            ``srun`` step) whose allocation has more than one task is refused
            instead of being treated as a single process. For commands that
            should use every task (``lora-dist train``); file work such as
            ``merge``/``verify``/``export`` keeps the default and runs as one
            process there.

    Returns:
        The launch environment. For MPI, ``master_addr`` is ``""`` and
        ``master_port`` is 0 unless ``MASTER_ADDR``/``MASTER_PORT`` are set
        (rank 0 chooses them in ``init_distributed``), and local/node counts
        the MPI library does not export are ``UNKNOWN``. For a single process
        ``master_port`` is ``MASTER_PORT`` or 0.

    Raises:
        LaunchError: The variables are malformed or contradict each other.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        launch = _from_torchrun(env)
    elif _mpi_rank_var(env) is not None and not _srun_agrees_with_mpi(env):
        launch = _from_mpi(env)
    elif "SLURM_PROCID" in env:
        launch = _from_slurm(env)
    else:
        launch = _single(env)
    if not allow_batch_shell and launch.launcher == "single":
        _refuse_multi_task_batch_shell(env)
    _validate(launch)
    return launch


def init_distributed(timeout_s: float = 600, backend: str | None = None, *,
                     allow_batch_shell: bool = True) -> LaunchEnv:
    """Initializes the default ``torch.distributed`` process group.

    Detects the launcher, bootstraps MPI through mpi4py if needed, checks that
    rank 0 can bind the master port where this process hosts the store, waits
    until all ranks joined, then calls ``init_process_group``. A world of one
    still gets a (store-only, port-free) process group so that collectives
    work the same everywhere. Calling it again while initialized returns the
    same environment; a process group initialized by someone else (e.g.
    ``deepspeed.init_distributed``) is kept if its rank and size match the
    launcher's.

    Args:
        timeout_s: Seconds to wait for all ranks to join; also the process
            group's collective timeout.
        backend: ``torch.distributed`` backend; default ``nccl`` when CUDA is
            available (after ``torch.cuda.set_device(local_rank)``), else
            ``gloo``.
        allow_batch_shell: False to refuse running as one process in the
            shell of a multi-task Slurm allocation (see ``detect_launch_env``);
            training passes False.

    Returns:
        The launch environment with every field resolved.

    Raises:
        LaunchError: Inconsistent environment, mpi4py missing under MPI,
            master port in use, master unreachable, or ranks that did not
            join within ``timeout_s``.
    """
    global _active_env
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if _active_env is not None:
            return _active_env
        launch = detect_launch_env(allow_batch_shell=allow_batch_shell)
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise LaunchError(
                f"torch.distributed was initialized elsewhere as rank {dist.get_rank()} of {dist.get_world_size()} "
                f"but the {launch.launcher} environment says rank {launch.rank} of {launch.world_size}; let "
                f"lora_dist.env.init_distributed() initialize it")
        return launch

    launch = detect_launch_env(allow_batch_shell=allow_batch_shell)
    timeout = timedelta(seconds=timeout_s)
    if launch.launcher == "mpi" and launch.distributed:
        launch = _mpi_bootstrap(launch)
    elif launch.launcher == "slurm" and launch.distributed and "MASTER_ADDR" not in os.environ:
        launch = replace(launch, master_addr=_slurm_reachable_addr(launch.master_addr))
    if launch.master_port == 0:
        launch = replace(launch, master_port=_free_port())
    if launch.launcher == "single" and launch.master_addr in ("", "localhost"):
        launch = replace(launch, master_addr="127.0.0.1")
    _validate(launch)

    device_index = _select_device(torch, launch)
    if backend is None:
        backend = "nccl" if device_index is not None else "gloo"

    if launch.distributed:
        store = _rendezvous(launch, timeout)
        # torchrun's agent store outlives worker restarts: a fresh prefix per attempt keeps the
        # restarted group from reading the dead workers' addresses.
        attempt = "{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        store = dist.PrefixStore(f"default_pg/{attempt}", store)
    else:
        store = dist.HashStore()

    kwargs = {}
    if backend == "nccl" and device_index is not None:
        kwargs["device_id"] = torch.device("cuda", device_index)
    try:
        dist.init_process_group(backend=backend, store=store, rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout, **kwargs)
        if launch.distributed:
            dist.barrier()
    except Exception as exc:
        if dist.is_initialized():
            dist.destroy_process_group()
        if _is_timeout(exc):
            raise LaunchError(
                f"rank {launch.rank}: process group init timed out after {timeout_s:g}s; expected world size "
                f"{launch.world_size} but some ranks did not join ({_first_line(exc)}); check that all "
                f"ranks started and can reach each other") from exc
        raise

    _export_environ(launch)
    _active_env = launch
    return launch


def destroy_distributed() -> None:
    """Destroys the default process group and restores exported variables.

    Safe to call when nothing was initialized.
    """
    global _active_env
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in _saved_environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_environ.clear()
    _active_env = None


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands a Slurm hostlist expression into host names.

    Supports comma-separated items, bracketed ranges and lists with zero
    padding, and several bracket groups per item, e.g.
    ``n[1-3,7],gpu-a[01-02]`` or ``rack[1-2]-n[1-2]``.

    Args:
        hostlist: The expression, as in ``SLURM_JOB_NODELIST``.

    Returns:
        The host names in order.

    Raises:
        LaunchError: The expression is malformed.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_hostlist_item(item, hostlist))
    if not hosts:
        raise LaunchError(f"empty Slurm nodelist {hostlist!r}; run inside an allocation (srun/sbatch)")
    return hosts


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            other = "WORLD_SIZE" if name == "RANK" else "RANK"
            raise LaunchError(f"{other} is set but {name} is not; launch with torchrun or set RANK, "
                              f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT together")
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE")
    if world_size < 1:
        raise LaunchError(f"WORLD_SIZE={world_size} must be at least 1; fix the launcher arguments")
    local_rank = _int(env, "LOCAL_RANK", 0 if world_size == 1 else None)
    local_world_size = _first_int(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
    num_nodes = _first_int(env, ("GROUP_WORLD_SIZE", "CROSS_SIZE"))
    if local_world_size is None:
        local_world_size = world_size if num_nodes is None else -(-world_size // num_nodes)
    if num_nodes is None:
        num_nodes = -(-world_size // local_world_size) if local_world_size > 0 else 1
    node_rank = _first_int(env, ("GROUP_RANK", "CROSS_RANK"))
    if node_rank is None:
        node_rank = rank // local_world_size if local_world_size > 0 else 0
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise LaunchError(f"RANK/WORLD_SIZE are set but {name} is not; launch with torchrun or export "
                                  f"MASTER_ADDR and MASTER_PORT of rank 0")
    return LaunchEnv(
        launcher="torchrun", rank=rank, local_rank=local_rank, world_size=world_size,
        local_world_size=local_world_size, node_rank=node_rank, num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=_int(env, "MASTER_PORT", 0))


def _mpi_rank_var(env: Mapping[str, str]) -> str | None:
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in env:
            return name
    return None


def _mpi_size_var(env: Mapping[str, str]) -> str:
    return "OMPI_COMM_WORLD_SIZE" if "OMPI_COMM_WORLD_RANK" in env else "PMI_SIZE"


def _is_srun_task(env: Mapping[str, str]) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None:
        return "SLURM_STEP_NUM_TASKS" in env
    return step.strip().lower() not in _BATCH_STEP_IDS


def _srun_agrees_with_mpi(env: Mapping[str, str]) -> bool:
    if "SLURM_PROCID" not in env or not _is_srun_task(env):
        return False
    rank_var = _mpi_rank_var(env)
    size = env.get(_mpi_size_var(env))
    slurm_size = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    return env.get(rank_var) == env["SLURM_PROCID"] and size is not None and size == slurm_size


def _from_mpi(env: Mapping[str, str]) -> LaunchEnv:
    rank_var = _mpi_rank_var(env)
    size_var = _mpi_size_var(env)
    if size_var not in env:
        raise LaunchError(f"{rank_var} is set but {size_var} is not; launch with mpirun/mpiexec or unset {rank_var}")
    rank = _int(env, rank_var)
    world_size = _int(env, size_var)
    if world_size < 1:
        raise LaunchError(f"{size_var}={world_size} must be at least 1; fix the mpirun arguments")
    if rank_var == "OMPI_COMM_WORLD_RANK":
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", UNKNOWN)
        local_world_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", UNKNOWN)
    else:
        local_rank = _int(env, "MPI_LOCALRANKID", UNKNOWN)
        local_world_size = _int(env, "MPI_LOCALNRANKS", UNKNOWN)
    if world_size == 1:
        local_rank, local_world_size = 0, 1
    if local_world_size > 0 and world_size % local_world_size == 0:
        num_nodes = world_size // local_world_size
        node_rank = rank // local_world_size
    else:
        num_nodes = node_rank = UNKNOWN
    return LaunchEnv(
        launcher="mpi", rank=rank, local_rank=local_rank, world_size=world_size,
        local_world_size=local_world_size, node_rank=node_rank, num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1" if world_size == 1 else ""),
        master_port=_int(env, "MASTER_PORT", 0))


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    job_id = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID"))
    if not job_id:
        raise LaunchError("SLURM_PROCID is set but SLURM_JOB_ID is not, so this is not inside a Slurm "
                          "allocation; run under srun/sbatch or unset the SLURM_* variables")
    if not _is_srun_task(env):
        return _single(env)
    rank = _int(env, "SLURM_PROCID")
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if size_var not in env and "SLURM_NPROCS" in env:
        size_var = "SLURM_NPROCS"
    world_size = _int(env, size_var)
    nodes_var = next((n for n in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") if n in env), None)
    num_nodes = _int(env, nodes_var) if nodes_var else 1
    node_rank = _int(env, "SLURM_NODEID", 0 if num_nodes == 1 else None)
    local_rank = _int(env, "SLURM_LOCALID", 0 if world_size == 1 else None)
    if world_size < 1 or num_nodes < 1:
        raise LaunchError(f"{size_var}={world_size} and {nodes_var}={num_nodes} must be at least 1; "
                          f"fix the srun/sbatch request")

    per_node_var = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in env), None)
    local_world_size = None
    if per_node_var is not None:
        counts = _expand_tasks_per_node(env[per_node_var])
        if len(counts) != num_nodes or sum(counts) != world_size:
            raise LaunchError(
                f"{per_node_var}={env[per_node_var]!r} describes {sum(counts)} tasks on {len(counts)} nodes but "
                f"{size_var}={world_size} and {nodes_var}={num_nodes}; make --ntasks, --nodes and "
                f"--ntasks-per-node agree")
        if 0 <= node_rank < len(counts):
            local_world_size = counts[node_rank]
    # srun gives every step its own layout (SLURM_STEP_TASKS_PER_NODE, checked above) but passes the job's
    # SLURM_NTASKS_PER_NODE through unchanged: `srun --ntasks=1` in an --ntasks-per-node=2 job is fine.
    if "SLURM_NTASKS_PER_NODE" in env and "SLURM_NTASKS" in env and "SLURM_STEP_TASKS_PER_NODE" not in env:
        ntasks = _int(env, "SLURM_NTASKS")
        per_node = _int(env, "SLURM_NTASKS_PER_NODE")
        nnodes = _int(env, "SLURM_NNODES", num_nodes)
        if ntasks != nnodes * per_node:
            raise LaunchError(
                f"SLURM_NTASKS={ntasks} but SLURM_NNODES={nnodes} x SLURM_NTASKS_PER_NODE={per_node} = "
                f"{nnodes * per_node}; request --ntasks equal to --nodes x --ntasks-per-node (or give only one)")
        if local_world_size is None and world_size == ntasks:
            local_world_size = per_node
    if local_world_size is None:
        local_world_size = -(-world_size // num_nodes)

    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    else:
        nodelist_var = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
                             if env.get(n)), None)
        if nodelist_var is None:
            raise LaunchError("srun task without SLURM_JOB_NODELIST/SLURM_STEP_NODELIST; set MASTER_ADDR to "
                              "the first node's address or launch with srun inside an allocation")
        master_addr = expand_hostlist(env[nodelist_var])[0]
    if env.get("MASTER_PORT"):
        master_port = _int(env, "MASTER_PORT")
    else:
        job_number = re.match(r"\d+", job_id.strip())
        if job_number is None:
            raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not numeric; set MASTER_PORT explicitly")
        master_port = 10000 + int(job_number.group()) % 50000
    return LaunchEnv(
        launcher="slurm", rank=rank, local_rank=local_rank, world_size=world_size,
        local_world_size=local_world_size, node_rank=node_rank, num_nodes=num_nodes,
        master_addr=master_addr, master_port=master_port)


def _allocation_tasks(env: Mapping[str, str]) -> tuple[int, str] | None:
    """Tasks of the Slurm allocation whose shell (not ``srun`` task) this is, and the variables that say so.

    None outside an allocation, inside an ``srun`` step, or when the count is
    not readable (the shell then stays a single process).
    """
    if not env.get("SLURM_JOB_ID", env.get("SLURM_JOBID")) or _is_srun_task(env):
        return None
    for name in ("SLURM_NTASKS", "SLURM_NPROCS"):
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value), f"{name}={value}"
    value = env.get("SLURM_TASKS_PER_NODE", "").strip()
    if value:
        try:
            return sum(_expand_tasks_per_node(value)), f"SLURM_TASKS_PER_NODE={value}"
        except LaunchError:
            pass
    for name in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value), f"{name}={value}"
    return None


def _refuse_multi_task_batch_shell(env: Mapping[str, str]) -> None:
    tasks = _allocation_tasks(env)
    if tasks is None or tasks[0] <= 1:
        return
    count, source = tasks
    job_id = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID"))
    nodes = env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES"))
    where = f"{count} tasks" + (f" on {nodes} nodes" if nodes and nodes.strip() not in ("", "1") else "")
    raise LaunchError(
        f"slurm: running in the batch shell of job {job_id} ({source}: {where}), not in an srun task, so "
        f"training would use one process of the allocation; run it under srun (one task per GPU) or "
        f"srun + torchrun; see slurm/*.sbatch")


def _single(env: Mapping[str, str]) -> LaunchEnv:
    return LaunchEnv(
        launcher="single", rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
        num_nodes=1, master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=_int(env, "MASTER_PORT", 0))


def _validate(launch: LaunchEnv) -> None:
    name = launch.launcher
    if not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"{name}: rank {launch.rank} is outside world size {launch.world_size}; "
                          f"the launcher variables are inconsistent, relaunch with matching rank/world size")
    if launch.local_world_size != UNKNOWN:
        if not 1 <= launch.local_world_size <= launch.world_size:
            raise LaunchError(f"{name}: local world size {launch.local_world_size} is not within 1..world size "
                              f"{launch.world_size}; fix the per-node process count")
        if launch.local_rank != UNKNOWN and not 0 <= launch.local_rank < launch.local_world_size:
            raise LaunchError(f"{name}: local rank {launch.local_rank} is outside local world size "
                              f"{launch.local_world_size}; fix the per-node process count")
    if launch.num_nodes != UNKNOWN:
        if not 1 <= launch.num_nodes <= launch.world_size:
            raise LaunchError(f"{name}: {launch.num_nodes} nodes for world size {launch.world_size}; "
                              f"request at least one process per node")
        if launch.node_rank != UNKNOWN and not 0 <= launch.node_rank < launch.num_nodes:
            raise LaunchError(f"{name}: node rank {launch.node_rank} is outside {launch.num_nodes} nodes; "
                              f"pass --node_rank in 0..nnodes-1")
    if launch.num_nodes > 1 and launch.master_addr:
        loopback = _loopback_address(launch.master_addr)
        if loopback is not None:
            raise LaunchError(
                f"{name}: {launch.num_nodes}-node job but master address {launch.master_addr!r} is loopback "
                f"({loopback}), unreachable from other nodes; set MASTER_ADDR (torchrun: --master_addr, or for "
                f"--rdzv_backend c10d --local_addr on the first node) to the first node's network address")
    if not 0 <= launch.master_port < 65536:
        raise LaunchError(f"{name}: master port {launch.master_port} is not a TCP port; set MASTER_PORT in 1..65535")


def _loopback_address(host: str) -> str | None:
    host = host.strip().strip("[]")
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except (OSError, UnicodeError):
            return None
        addresses = sorted({info[4][0] for info in infos})
        ips = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
        if ips and all(ip.is_loopback or ip.is_unspecified for ip in ips):
            return f"{host} resolves to {', '.join(addresses)}"
        return None
    return str(ip) if ip.is_loopback or ip.is_unspecified else None


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value.strip() == "":
        if default is None:
            raise LaunchError(f"{name} is not set; launch with the matching launcher or export {name}")
        return default
    try:
        return int(value.strip())
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer; fix or unset {name}") from None


def _first_int(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return _int(env, name)
    return None


def _expand_tasks_per_node(value: str) -> list[int]:
    counts: list[int] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise LaunchError(f"cannot parse Slurm tasks-per-node {value!r}; expected e.g. '2(x3),1'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                break
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"unbalanced brackets in Slurm nodelist {text!r}; set MASTER_ADDR explicitly")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_hostlist_item(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise LaunchError(f"cannot parse Slurm nodelist {whole!r}; set MASTER_ADDR explicitly")
        return [item]
    prefix = item[: match.start()]
    if "[" in prefix or "]" in prefix:
        raise LaunchError(f"cannot parse Slurm nodelist {whole!r}; set MASTER_ADDR explicitly")
    tails = _expand_hostlist_item(item[match.end():], whole)
    hosts = []
    for part in match.group(1).split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if bounds is None or (bounds.group(2) is not None and int(bounds.group(2)) < int(bounds.group(1))):
            raise LaunchError(f"cannot parse range {part!r} in Slurm nodelist {whole!r}; set MASTER_ADDR explicitly")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        for number in range(int(low), int(high) + 1):
            hosts.extend(prefix + str(number).zfill(len(low)) + tail for tail in tails)
    return hosts


def _slurm_reachable_addr(host: str) -> str:
    """Maps a Slurm node name that DNS does not know to its ``NodeAddr``."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except (OSError, UnicodeError):
        pass
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run([scontrol, "show", "node", "-o", host], capture_output=True, text=True,
                                 timeout=15, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        match = re.search(r"\bNodeAddr=(\S+)", out)
        if match and match.group(1) != host:
            return match.group(1)
    raise LaunchError(f"cannot resolve master node {host!r} (first host of the Slurm nodelist); "
                      f"set MASTER_ADDR to its address")


def _mpi_bootstrap(launch: LaunchEnv) -> LaunchEnv:
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError("launched under MPI but mpi4py is not installed: pip install mpi4py "
                          "(or launch with torchrun/srun instead)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launch.world_size or comm.Get_rank() != launch.rank:
        raise LaunchError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment says rank "
                          f"{launch.rank} of {launch.world_size}; mpi4py is linked to a different MPI than the "
                          f"launcher, reinstall mpi4py against it")
    hosts = comm.allgather(MPI.Get_processor_name())
    node_names = list(dict.fromkeys(hosts))
    me = hosts[launch.rank]
    local_rank = launch.local_rank if launch.local_rank != UNKNOWN else hosts[: launch.rank].count(me)
    local_world_size = launch.local_world_size if launch.local_world_size != UNKNOWN else hosts.count(me)
    num_nodes = len(node_names)

    decision: tuple[str, int, str | None] | None = None
    if launch.rank == 0:
        try:
            addr = os.environ.get("MASTER_ADDR") or _own_address(multi_node=num_nodes > 1, peers=node_names[1:])
            port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else _free_port()
            _check_port_free(port, "mpi", "MASTER_PORT" if os.environ.get("MASTER_PORT") else "picked by rank 0")
            decision = (addr, port, None)
        except (LaunchError, ValueError) as exc:
            decision = ("", 0, str(exc))
    addr, port, error = comm.bcast(decision, root=0)
    if error is not None:
        raise LaunchError(error if launch.rank == 0 else f"rank 0 failed to set up the rendezvous: {error}")
    return replace(launch, local_rank=local_rank, local_world_size=local_world_size,
                   node_rank=node_names.index(me), num_nodes=num_nodes, master_addr=addr, master_port=port)


def _own_address(multi_node: bool, peers: list[str]) -> str:
    if not multi_node:
        return "127.0.0.1"
    hostname = socket.gethostname()
    if _loopback_address(hostname) is None:
        return hostname
    for target in [*peers, "192.0.2.1"]:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))
                addr = probe.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.ip_address(addr).is_loopback:
            return addr
    raise LaunchError(f"rank 0 hostname {hostname!r} resolves to loopback and no routable address was found; "
                      f"export MASTER_ADDR=<rank 0 node address> to all ranks (mpirun -x MASTER_ADDR)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _check_port_free(port: int, launcher: str, source: str) -> None:
    families = [socket.AF_INET] + ([socket.AF_INET6] if socket.has_ipv6 else [])
    for family in families:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LaunchError(f"{launcher}: master port {port} ({source}) is already in use on "
                                  f"{socket.gethostname()}; set MASTER_PORT to a free port") from None
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
        finally:
            sock.close()


def _hosts_store(launch: LaunchEnv) -> bool:
    if launch.rank != 0:
        return False
    return not (launch.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def _port_source(launch: LaunchEnv) -> str:
    if os.environ.get("MASTER_PORT"):
        return "MASTER_PORT"
    return "derived from SLURM_JOB_ID" if launch.launcher == "slurm" else "picked by rank 0"


def _rendezvous(launch: LaunchEnv, timeout: timedelta):
    """Connects to (rank 0: hosts) the TCP store and waits until every rank joined."""
    import torch.distributed as dist

    if _hosts_store(launch) and launch.launcher != "mpi":
        _check_port_free(launch.master_port, launch.launcher, _port_source(launch))
    host = launch.master_addr
    url_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = "env://" if launch.launcher == "torchrun" else f"tcp://{url_host}:{launch.master_port}"
    start = time.monotonic()
    endpoint = f"{host}:{launch.master_port}"
    if not _hosts_store(launch):
        _wait_reachable(launch, timeout)
    try:
        store, _, _ = next(dist.rendezvous(url, rank=launch.rank, world_size=launch.world_size, timeout=timeout))
    except Exception as exc:
        message = _first_line(exc)
        if "address already in use" in message.lower() or "eaddrinuse" in message.lower():
            raise LaunchError(f"{launch.launcher}: master port {launch.master_port} is already in use on "
                              f"{socket.gethostname()}; set MASTER_PORT to a free port") from exc
        if _hosts_store(launch):
            raise LaunchError(
                f"rank 0 hosting the store at {endpoint}: expected world size {launch.world_size} but some ranks "
                f"did not join within {timeout.total_seconds():g}s ({message}); start all ranks or fix their "
                f"MASTER_ADDR/MASTER_PORT") from exc
        raise LaunchError(
            f"rank {launch.rank} could not join the store at {endpoint} within {timeout.total_seconds():g}s "
            f"(expected world size {launch.world_size}; {message}); check that rank 0 is running and "
            f"{endpoint} is reachable from this node") from exc

    key = "lora_dist/joined/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""),
                                          os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    deadline = start + timeout.total_seconds()
    joined = store.add(key, 1)
    while joined < launch.world_size:
        if time.monotonic() > deadline:
            raise LaunchError(
                f"rank {launch.rank}: only {joined} of {launch.world_size} ranks joined the store at {endpoint} "
                f"within {timeout.total_seconds():g}s; some ranks did not join, start all ranks or raise the timeout")
        time.sleep(_JOIN_POLL_S)
        joined = store.add(key, 0)
    return store


def _wait_reachable(launch: LaunchEnv, timeout: timedelta) -> None:
    """Waits until the master endpoint accepts TCP connections.

    The TCP store client retries with its own back-off and can take several
    times its timeout to give up; probing first keeps ``timeout_s`` exact.
    """
    endpoint = f"{launch.master_addr}:{launch.master_port}"
    deadline = time.monotonic() + timeout.total_seconds()
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((launch.master_addr.strip("[]"), launch.master_port),
                                          timeout=max(0.1, min(2.0, remaining))):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise LaunchError(
        f"rank {launch.rank} could not reach the master at {endpoint} within {timeout.total_seconds():g}s "
        f"(expected world size {launch.world_size}; {last_error}); some ranks did not join: check that rank 0 "
        f"is running and {endpoint} is reachable from this node")


def _select_device(torch, launch: LaunchEnv) -> int | None:
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if launch.local_rank < count:
        index = launch.local_rank
    elif count == 1:
        index = 0
    else:
        raise LaunchError(f"local rank {launch.local_rank} but only {count} GPUs are visible; start at most "
                          f"{count} processes per node or fix CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(index)
    return index


def _is_timeout(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, (TimeoutError, dist.DistStoreError)) or "timed out" in text or "timeout" in text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _export_environ(launch: LaunchEnv) -> None:
    values = {
        "RANK": launch.rank, "LOCAL_RANK": launch.local_rank, "WORLD_SIZE": launch.world_size,
        "LOCAL_WORLD_SIZE": launch.local_world_size, "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": launch.master_port,
    }
    for name in _EXPORTED_VARS:
        _saved_environ.setdefault(name, os.environ.get(name))
        os.environ[name] = str(values[name])
