"""``torch.distributed`` initialization: the side effects of launching.

``init_distributed`` detects the launch (:mod:`lora_dist.launch.detect`),
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
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

from lora_dist.launch.detect import detect_launch_env, loopback_address, validate_launch_env
from lora_dist.launch.env import UNKNOWN, LaunchEnv, LaunchError

if TYPE_CHECKING:
    import torch

__all__ = ["destroy_distributed", "free_port", "init_distributed", "run_device", "say_stopped", "select_device",
           "stopped_rank"]

_EXPORTED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


_JOIN_POLL_S = 0.02


_active_env: LaunchEnv | None = None
_active_device = None
_patient = None
_store = None  # the rendezvous store of a launch lora_dist joined (:func:`say_stopped`)
#: :func:`patient_group`'s timeout (seconds): a day.
PATIENT_WAIT_S = 24 * 3600.0


_saved_environ: dict[str, str | None] = {}


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
    launcher's, and its device adopted (:func:`run_device`: this rank's GPU
    where the group has NCCL, else the CPU).

    Args:
        timeout_s: Seconds to wait for all ranks to join; also the process
            group's collective timeout.
        backend: ``torch.distributed`` backend; default ``nccl`` when CUDA is
            available (after ``torch.cuda.set_device(local_rank)``), else
            ``gloo``. A backend without NCCL runs the rank on the CPU: no GPU
            is selected or made current.
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
    global _active_env, _active_device, _patient, _store
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
                f"lora_dist.launch.init_distributed() initialize it")
        # Adopt the group (DeepSpeed's, accelerate's, the user's): with a CUDA backend (NCCL) the run is on the
        # GPU the group is bound to, else this rank's as chosen below; without one, collectives take CPU tensors.
        device = torch.device("cpu")
        if "nccl" in str(dist.get_backend()).lower():
            bound = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)
            device = bound if bound is not None else select_device(launch)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _active_device = device  # the environment is checked again at each call: the group is not ours
        return launch

    launch = detect_launch_env(allow_batch_shell=allow_batch_shell)
    timeout = timedelta(seconds=timeout_s)
    if launch.launcher == "mpi" and launch.distributed:
        launch = _mpi_bootstrap(launch)
    elif launch.launcher == "slurm" and launch.distributed and "MASTER_ADDR" not in os.environ:
        launch = replace(launch, master_addr=_slurm_reachable_addr(launch.master_addr))
    if launch.master_port == 0:
        launch = replace(launch, master_port=free_port())
    if launch.launcher == "single" and launch.master_addr in ("", "localhost"):
        launch = replace(launch, master_addr="127.0.0.1")
    validate_launch_env(launch)

    # A group for CPU tensors only (``lora-dist merge``: file work) claims no GPU: no CUDA context, no one-GPU-per-
    # rank check for ranks that never touch one.
    cpu_only = backend is not None and "nccl" not in backend.lower()
    device = torch.device("cpu") if cpu_only else select_device(launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend is None:
        # NCCL for CUDA tensors, and gloo for any CPU tensor a library hands to a collective: one group,
        # chosen here once. lora_dist's own collectives use tensors on the run's device.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"

    if launch.distributed:
        store = _rendezvous(launch, timeout)
        # torchrun's agent store outlives worker restarts: a fresh prefix per attempt keeps the
        # restarted group from reading the dead workers' addresses.
        attempt = "{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        store = dist.PrefixStore(f"default_pg/{attempt}", store)
    else:
        store = dist.HashStore()

    kwargs = {}
    if launch.distributed and device.type == "cuda":
        _check_distinct_gpus(store, launch, device)
    if "nccl" in backend and device.type == "cuda":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(backend=backend, store=store, rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout, **kwargs)
        if launch.distributed:
            dist.barrier()
            # Made now, while every rank is here: a group made later would itself wait for a rank that never
            # comes. Its connections are open from the start, so a rank that dies closes them.
            _patient = dist.new_group(backend="gloo", timeout=timedelta(seconds=PATIENT_WAIT_S))
    except Exception as exc:
        if dist.is_initialized():
            dist.destroy_process_group()
        if _is_timeout(exc):
            raise LaunchError(
                f"rank {launch.rank}: process group init timed out after {timeout_s:g}s; expected world size "
                f"{launch.world_size} but some ranks did not join ({_first_line(exc)}); check that all "
                f"ranks started and can reach each other") from exc
        raise

    _export_environ(launch, device)
    _active_env, _active_device = launch, device
    _store = store if launch.distributed else None
    return launch


def destroy_distributed() -> None:
    """Destroys the default process group and restores exported variables.

    Safe to call when nothing was initialized.
    """
    global _active_env, _active_device, _patient, _store
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, the patient one too
    _patient = _store = None
    for name, value in _saved_environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_environ.clear()
    _active_env = _active_device = None


def exit_distributed(code: int = 0, destroy: bool = True) -> None:
    """End a process that joined a process group: destroy it and exit with ``code``, without interpreter teardown.
    ``destroy`` False leaves the groups as they are (a wait on one may still be in flight, and destroying the
    group would wait for it: a rank stopped before training, :func:`lora_dist.preemption.stop_exits`).

    Call it last, once every output is written (they are fsynced and barrier-synchronized by then). Under load,
    C++ threads of process groups still referenced by FSDP meshes (or a trainer holding them) can abort the
    interpreter's teardown ("terminate called without an active exception") and turn a finished run into a
    failed one. One process that never joined a group just exits.
    """
    import sys

    import torch.distributed as dist

    was_distributed = dist.is_available() and dist.is_initialized()
    if destroy:
        destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    if was_distributed:
        os._exit(code)
    sys.exit(code)


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
    num_nodes, node_rank = len(node_names), node_names.index(me)
    shared_name = num_nodes == 1 and local_world_size < launch.world_size
    if shared_name:
        # Nodes that share a host name (containers started with one --hostname, network namespaces): the
        # launcher's local size tells them apart, the ranks numbered node by node as mpirun places them by default.
        # Every rank judges the same gathered layout, so all raise or none does (an MPI collective has no timeout).
        layout = comm.allgather((local_rank, local_world_size))
        if {size for _, size in layout} != {local_world_size} or \
                [r for r, _ in layout] != [r % local_world_size for r in range(launch.world_size)]:
            raise LaunchError(f"the {launch.world_size} ranks share one host name ({me!r}) on several nodes and are "
                              "not placed node by node, as many on each, so lora_dist cannot tell the nodes apart; "
                              "place them by slot (mpirun --map-by slot) or give each node its own host name")
        num_nodes, node_rank = -(-launch.world_size // local_world_size), launch.rank // local_world_size

    decision: tuple[str, int, str | None] | None = None
    if launch.rank == 0:
        try:
            addr = os.environ.get("MASTER_ADDR") or _own_address(multi_node=num_nodes > 1, peers=node_names[1:],
                                                                  by_name=not shared_name)
            port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else free_port()
            _check_port_free(port, "mpi", "MASTER_PORT" if os.environ.get("MASTER_PORT") else "picked by rank 0")
            decision = (addr, port, None)
        except (LaunchError, ValueError) as exc:
            decision = ("", 0, str(exc))
    addr, port, error = comm.bcast(decision, root=0)
    if error is not None:
        raise LaunchError(error if launch.rank == 0 else f"rank 0 failed to set up the rendezvous: {error}")
    return replace(launch, local_rank=local_rank, local_world_size=local_world_size,
                   node_rank=node_rank, num_nodes=num_nodes, master_addr=addr, master_port=port)


def _own_address(multi_node: bool, peers: list[str], by_name: bool = True) -> str:
    """Rank 0's address for the others: loopback on one node; else its host name where that resolves to no
    loopback (``by_name``: not where the nodes share one name, which each resolves to itself), else the source
    address of its route to a peer."""
    if not multi_node:
        return "127.0.0.1"
    hostname = socket.gethostname()
    if by_name and loopback_address(hostname) is None:
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
    why = f"hostname {hostname!r} resolves to loopback" if by_name else f"the nodes share the hostname {hostname!r}"
    raise LaunchError(f"rank 0: {why} and no routable address was found; export MASTER_ADDR=<rank 0 node address> "
                      "to all ranks (mpirun -x MASTER_ADDR)")


def free_port() -> int:
    """A TCP port free on this host right now."""
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


def select_device(launch: LaunchEnv, cuda_count: int | None = None) -> torch.device:
    """The one rule for this rank's device; everything (the model, collectives, DeepSpeed) uses it.

    Without CUDA: the CPU. With as many visible GPUs as local ranks (or more): ``cuda:<local rank>``.
    With fewer: ``cuda:<local rank mod visible GPUs>`` - each task sees the GPUs it was bound to
    (``--gpus-per-task``, ``--gpu-bind=closest``: ranks 4-7 of 8 see the second socket's 4 GPUs as
    ``cuda:0-3``; one GPU per task: ``cuda:0``); :func:`init_distributed` then checks that no two ranks of
    a node got the same one (more ranks than GPUs on a node, each seeing all of them, are refused there).
    """
    import torch

    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0 or (cuda_count is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", max(launch.local_rank, 0) % count)


def patient_group():
    """A gloo group of every rank, made by :func:`init_distributed`, whose collectives wait up to
    :data:`PATIENT_WAIT_S` instead of ``parallel.timeout_s``: for the waits on one rank's long work (the token
    cache build, a merged export's final fsync). None where lora_dist did not make the default group, or one
    process."""
    return _patient


def say_stopped(rank: int, key: str) -> None:
    """Leave word in the rendezvous store, under ``key``, that ``rank`` stops before training
    (:func:`lora_dist.preemption.stopping`), for the ranks whose collective then fails because it left
    (:func:`stopped_rank`). Best effort: a store that is gone is no reason not to stop. Where this rank hosts the
    store (rank 0 under srun, mpirun or a launch by hand; not under torchrun, whose agent does), the word leaves
    with it."""
    if _store is not None:
        try:
            _store.set(key, str(rank))
        except Exception:  # the store's host left first
            pass


def stopped_rank(key: str) -> int | None:
    """The rank that said it stopped before training (:func:`say_stopped`), where one did and the store answers."""
    if _store is None:
        return None
    try:
        return int(_store.get(key)) if _store.check([key]) else None
    except Exception:  # the store's host left
        return None


def run_device() -> torch.device:
    """The device :func:`init_distributed` chose for this process (the CPU before it ran)."""
    import torch

    return _active_device or torch.device("cpu")


def _check_distinct_gpus(store, launch: LaunchEnv, device) -> None:
    """Refuse, in one line on every rank, two ranks of one node on one GPU (NCCL would abort with "Duplicate GPU
    detected"). A few store requests per rank, whatever the world size: each rank claims its GPU, a second claimant
    records the clash, and the last rank to claim tells every rank to look."""
    import torch

    host, uuid = socket.gethostname(), torch.cuda.get_device_properties(device).uuid
    owner = store.compare_set(f"lora_dist/gpu/{host}|{uuid}", "", str(launch.rank)).decode()
    if owner != str(launch.rank):
        first, second = sorted((int(owner), launch.rank))
        store.set("lora_dist/gpu/clash", f"ranks {first} and {second} both use GPU {uuid} on {host}: each rank "
                                         "needs its own GPU; start at most one process per visible GPU (check "
                                         "CUDA_VISIBLE_DEVICES, --gpus-per-task and --gpu-bind)")
    if store.add("lora_dist/gpu/claimed", 1) == launch.world_size:
        store.set("lora_dist/gpu/all-claimed", "")
    store.wait(["lora_dist/gpu/all-claimed"])
    if store.check(["lora_dist/gpu/clash"]):
        raise LaunchError(store.get("lora_dist/gpu/clash").decode())


def _is_timeout(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, (TimeoutError, dist.DistStoreError)) or "timed out" in text or "timeout" in text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _export_environ(launch: LaunchEnv, device) -> None:
    # DeepSpeed picks its device as cuda:LOCAL_RANK: where each task sees its own single GPU that is
    # cuda:0 whatever the local rank, so LOCAL_RANK carries the device index there.
    local_rank = device.index if device.type == "cuda" else launch.local_rank
    values = {
        "RANK": launch.rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": launch.world_size,
        "LOCAL_WORLD_SIZE": launch.local_world_size, "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": launch.master_port,
    }
    for name in _EXPORTED_VARS:
        _saved_environ.setdefault(name, os.environ.get(name))
        os.environ[name] = str(values[name])
