"""Launch-environment detection: a mapping of environment variables in, a :class:`LaunchEnv` out.

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

Detection is pure: it reads the mapping it is given (``os.environ`` by default) and
touches nothing else; :mod:`lora_dist.launch.distributed` does the side effects.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from lora_dist.launch.env import UNKNOWN, LaunchEnv, LaunchError
from lora_dist.launch.hostlist import expand_hostlist

__all__ = ["detect_launch_env", "job_restart", "loopback_address", "slurm_port", "validate_launch_env"]

_BATCH_STEP_IDS = {"batch", "extern", "interactive"}
#: Step ids above Slurm's SLURM_MAX_NORMAL_STEP_ID (0xfffffff0) are no srun step: the batch script, the extern
#: step, salloc's interactive step (0xfffffffa), written as numbers by some Slurm versions.
_MAX_NORMAL_STEP_ID = 0xFFFFFFF0


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
    validate_launch_env(launch)
    return launch


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
    step = step.strip().lower()
    return step not in _BATCH_STEP_IDS and not (step.isdigit() and int(step) > _MAX_NORMAL_STEP_ID)


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
        master_port = slurm_port(int(job_number.group()))
    return LaunchEnv(
        launcher="slurm", rank=rank, local_rank=local_rank, world_size=world_size,
        local_world_size=local_world_size, node_rank=node_rank, num_nodes=num_nodes,
        master_addr=master_addr, master_port=master_port)


#: The launchers that restart a job: the variable counting the restarts, how a restart is named.
_RESTARTS = {"torchrun": ("TORCHELASTIC_RESTART_COUNT", "torchrun restart"),
             "slurm": ("SLURM_RESTART_COUNT", "Slurm requeue")}


def restarting_launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher whose restart this is (``torchrun`` for ``--max-restarts``, ``slurm`` for a requeue), or None on
    the job's first start."""
    env = os.environ if environ is None else environ
    for launcher, (var, _) in _RESTARTS.items():
        count = env.get(var, "")
        if count.isdigit() and int(count) > 0:
            return launcher
    return None


def job_restart(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher's restart of this job (``torchrun --max-restarts``, a Slurm requeue), named with its count and
    variable, or None on the job's first start."""
    env = os.environ if environ is None else environ
    launcher = restarting_launcher(env)
    if launcher is None:
        return None
    var, what = _RESTARTS[launcher]
    return f"{what} {env[var]} ({var})"


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def launch_identity(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What names this launch to each launcher that restarts it, and no other launch: ``slurm``, the Slurm job (its
    id stays through requeues); ``torchrun``, the torchrun invocation that started this worker, the same in each of
    its restarts: ``--standalone``'s random run id, else the agent process (this worker's parent) by host, pid and
    start time (a ``--rdzv-id`` is the user's, ``none`` by default, the same for every job). Only those known."""
    env = os.environ if environ is None else environ
    identity = {}
    job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", ""))
    if job.isdigit():
        identity["slurm"] = job
    if "TORCHELASTIC_RUN_ID" in env:
        run = env["TORCHELASTIC_RUN_ID"]
        agent = run if _UUID.fullmatch(run) else _parent_process()
        if agent:
            identity["torchrun"] = agent
    return identity


def _parent_process() -> str | None:
    """This process's parent (torchrun's agent, for a worker) as ``host:pid@start``, its start time (clock ticks
    since boot) from ``/proc``; None where that cannot be read."""
    pid = os.getppid()
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return None
    return f"{socket.gethostname()}:{pid}@{start}"


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job without ``MASTER_PORT``, as the sbatch templates derive it: 20000-31999,
    below Linux's ephemeral range (32768-60999), so no outgoing connection of the node holds it; jobs 12000 ids
    apart share it."""
    return 20000 + job_id % 12000


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


def validate_launch_env(launch: LaunchEnv) -> None:
    """Raise a one-line :class:`LaunchError` if ``launch`` does not add up (ranks, sizes, loopback master, port)."""
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
        loopback = loopback_address(launch.master_addr)
        if loopback is not None:
            raise LaunchError(
                f"{name}: {launch.num_nodes}-node job but master address {launch.master_addr!r} is loopback "
                f"({loopback}), unreachable from other nodes; set MASTER_ADDR (torchrun: --master_addr, or for "
                f"--rdzv_backend c10d --local_addr on the first node) to the first node's network address")
    if not 0 <= launch.master_port < 65536:
        raise LaunchError(f"{name}: master port {launch.master_port} is not a TCP port; set MASTER_PORT in 1..65535")


def loopback_address(host: str) -> str | None:
    """Why ``host`` is a loopback (or unspecified) address, or None when other nodes may reach it."""
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
