"""What the benchmark measures inside each rank, and how.

Memory, per rank and per phase (setup, train, export):

* **Peak RSS** is the kernel's high-water mark ``VmHWM`` from
  ``/proc/self/status``. Writing ``5`` to ``/proc/self/clear_refs`` resets it
  to the current RSS, so every phase gets its own exact peak. Before a reset
  the process collects garbage and calls ``malloc_trim(0)`` so freed heap from
  an earlier phase is handed back instead of being counted again.
* **Peak anonymous RSS** is sampled every 5 ms by a thread reading
  ``RssAnon``. It leaves out file-backed pages (memory-mapped safetensors
  being read), which the kernel can drop under pressure and which therefore
  cannot cause an out-of-memory kill. It is sampled, so a spike shorter than
  the period can be missed.
* **Peak live tensor bytes**: on CUDA ``torch.cuda.max_memory_allocated``.
  On CPU PyTorch keeps no allocator statistics, so :class:`LiveTensorBytes`
  counts them: every tensor storage alive when it starts (found through the
  garbage collector), and every storage an operator creates or receives
  while it is active (a ``TorchDispatchMode``, which sees all ATen and c10d
  operators), each counted once by storage identity until a weak reference
  reports it freed. ``UntypedStorage.resize_`` is wrapped too, since FSDP2
  allocates and frees its unsharded parameters by resizing storages.

Communication: :class:`CommCounter` is a ``TorchDispatchMode`` that sees
every collective as the c10d operator it dispatches to (``c10d.allreduce_``,
``c10d._allgather_base_``, ``c10d._reduce_scatter_base_`` ...), whatever the
caller: ``torch.distributed`` functions, FSDP2, DeepSpeed's ``deepspeed.comm``
or DTensor's functional collectives, and whatever the backend (gloo, NCCL).
It records each call's payload (the full tensor of an all-reduce or
broadcast, the gathered output of an all-gather, the input of a
reduce-scatter) and converts it to the bytes one rank sends with the ring
algorithms gloo and NCCL use: ``2 (W-1)/W`` of the payload for an
all-reduce, ``(W-1)/W`` for all-gather and reduce-scatter, the payload for
a broadcast from its root.

Both dispatch modes add Python work to every operator, so they run on a
step of their own, never on a timed one.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "CommCounter",
    "held_bytes",
    "LiveTensorBytes",
    "PhaseMemory",
    "machine_info",
    "read_status_kb",
    "release_free_memory",
]


def read_status_kb(*keys: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in bytes (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0]) * 1024
    return out


def release_free_memory() -> None:
    """Collect garbage and give freed heap back to the OS, so the next phase starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _AnonSampler(threading.Thread):
    def __init__(self, period_s: float) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak = read_status_kb("RssAnon").get("RssAnon", 0)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, read_status_kb("RssAnon").get("RssAnon", 0))
            self._stop_event.wait(self.period_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, read_status_kb("RssAnon").get("RssAnon", 0))
        return self.peak


@dataclass
class PhaseMemory:
    """Peak RSS of one phase of the process (see the module docstring).

    Use as a context manager; the fields are filled on exit. On CUDA the
    device's peak allocated bytes for the phase are recorded too.
    """

    device: torch.device
    sample_period_s: float = 0.005
    start_rss: int = 0
    start_anon: int = 0
    peak_rss: int = 0
    peak_anon: int = 0
    peak_device_allocated: int | None = None
    hwm_reset: bool = False
    wall_s: float = 0.0
    _sampler: _AnonSampler | None = field(default=None, repr=False)
    _t0: float = field(default=0.0, repr=False)

    def __enter__(self) -> "PhaseMemory":
        release_free_memory()
        self.hwm_reset = _reset_hwm()
        status = read_status_kb("VmRSS", "RssAnon")
        self.start_rss, self.start_anon = status["VmRSS"], status.get("RssAnon", 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sampler = _AnonSampler(self.sample_period_s)
        self._sampler.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_device_allocated = torch.cuda.max_memory_allocated(self.device)
        self.wall_s = time.perf_counter() - self._t0
        assert self._sampler is not None
        self.peak_anon = self._sampler.stop()
        self.peak_rss = read_status_kb("VmHWM")["VmHWM"]

    def as_dict(self) -> dict:
        return {"start_rss": self.start_rss, "start_anon": self.start_anon, "peak_rss": self.peak_rss,
                "peak_anon": self.peak_anon, "peak_device_allocated": self.peak_device_allocated,
                "hwm_reset": self.hwm_reset, "wall_s": self.wall_s}


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind a tensor, looking through wrapper subclasses (DTensor)."""
    out, todo = [], [t]
    while todo:
        obj = todo.pop()
        if is_traceable_wrapper_subclass(obj):
            names, _ = obj.__tensor_flatten__()
            todo += [getattr(obj, n) for n in names if isinstance(getattr(obj, n), torch.Tensor)]
        elif obj.device.type != "meta" and not obj.is_sparse:
            try:
                out.append(obj.untyped_storage())
            except (NotImplementedError, RuntimeError):  # tensors without storage (functional, nested)
                pass
    return out


class LiveTensorBytes(TorchDispatchMode):
    """Live tensor-storage bytes on one device type, with their peak, while active.

    Args:
        device_type: only storages on this device type are counted ("cpu").
    """

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.start = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list = []
        self._orig_resize = torch.UntypedStorage.resize_

    def _add(self, st: torch.UntypedStorage) -> None:
        if st.device.type != self.device_type:
            return
        nbytes = st.nbytes()
        if not isinstance(nbytes, int):  # a symbolic size (a compiler's traced tensor): no memory of this device
            return
        size = self._sizes.get(st)
        if size is None:
            cell = [nbytes]
            self._sizes[st] = cell
            self._refs.append(weakref.ref(st, lambda _, cell=cell: self._free(cell)))
            self._grow(nbytes)
        elif size[0] != nbytes:  # resized behind our back
            self._grow(nbytes - size[0])
            size[0] = nbytes

    def _free(self, cell: list[int]) -> None:
        self.live -= cell[0]
        cell[0] = 0

    def _grow(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _track(self, obj) -> None:
        if isinstance(obj, torch.Tensor):
            for st in _storages(obj):
                self._add(st)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                self._track(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                self._track(item)

    def __enter__(self) -> "LiveTensorBytes":
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some objects trips deprecation warnings
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    self._track(obj)
        self.start = self.peak = self.live
        tracker = self

        def resize_(st, size):
            tracker._orig_resize(st, size)
            if st.device.type == tracker.device_type:
                cell = tracker._sizes.get(st)
                if cell is None:
                    tracker._add(st)
                elif cell[0] != st.nbytes():
                    tracker._grow(st.nbytes() - cell[0])
                    cell[0] = st.nbytes()

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._track(args)
        self._track(kwargs)
        out = func(*args, **kwargs)
        self._track(out)
        return out


#: c10d operators and what their payload is.
_PAYLOAD = {
    "allreduce_": ("all_reduce", "inout"),
    "allreduce_coalesced_": ("all_reduce", "inout"),
    "all_reduce": ("all_reduce", "inout"),
    "all_reduce_coalesced": ("all_reduce", "inout"),
    "broadcast_": ("broadcast", "inout"),
    "broadcast": ("broadcast", "inout"),
    "reduce_": ("reduce", "inout"),
    "_allgather_base_": ("all_gather", "output"),
    "allgather_": ("all_gather", "output"),
    "allgather_coalesced_": ("all_gather", "output"),
    "allgather_into_tensor_coalesced_": ("all_gather", "output"),
    "all_gather_into_tensor": ("all_gather", "output"),
    "all_gather_into_tensor_coalesced": ("all_gather", "output"),
    "_reduce_scatter_base_": ("reduce_scatter", "input"),
    "reduce_scatter_": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "input"),
    "alltoall_": ("all_to_all", "input"),
    "alltoall_base_": ("all_to_all", "input"),
    "all_to_all_single": ("all_to_all", "input"),
    "send": ("send", "input"),
    "recv_": ("recv", "input"),
    "gather_": ("gather", "input"),
    "scatter_": ("scatter", "output"),
}
#: Bytes one rank sends per payload byte with ring algorithms, as a function of the world size.
_WIRE = {
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "all_to_all": lambda w: (w - 1) / w,
    "broadcast": lambda w: 1.0,
    "reduce": lambda w: 1.0,
    "send": lambda w: 1.0,
    "recv": lambda w: 0.0,
    "gather": lambda w: 1.0,
    "scatter": lambda w: 1.0,
}


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            return sum(_tensor_bytes(getattr(obj, n)) for n in obj.__tensor_flatten__()[0])
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    return 0


def held_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for ``t``: a DTensor's local shard, a ZeRO-3 param's partition, the inner
    tensors of a tensor subclass (torchao's NF4: packed nibbles and scales)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return held_bytes(t.to_local())
    if hasattr(t, "ds_tensor"):
        return held_bytes(t.ds_tensor)
    inner = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return sum(held_bytes(getattr(inner, n)) for n in names)
    return inner.numel() * inner.element_size()


class CommCounter(TorchDispatchMode):
    """Bytes of every collective while active, by kind (see the module docstring).

    Args:
        world_size: ranks in the default group (for the ring wire-byte model).
    """

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size
        self.calls: dict[str, int] = {}
        self.payload: dict[str, int] = {}
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("c10d", "_c10d_functional"):
            return func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if name not in _PAYLOAD:
            if not name.startswith(("wait", "_wrap", "barrier", "monitored_barrier")):
                self.unknown.add(name)
            return func(*args, **kwargs)
        kind, which = _PAYLOAD[name]
        out = func(*args, **kwargs)
        if func.namespace == "_c10d_functional":  # (input, ...) -> output
            payload = out if which == "output" else args[0]
        elif which == "input" and name not in ("send", "recv_"):  # c10d ops: (output, input, ...)
            payload = args[1]
        else:
            payload = args[0]
        self._record(kind, _tensor_bytes(payload))
        return out

    def _record(self, kind: str, nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.payload[kind] = self.payload.get(kind, 0) + nbytes

    def wire_bytes(self) -> float:
        """Bytes this rank sends under the ring model."""
        return sum(_WIRE.get(k, lambda w: 1.0)(self.world_size) * v for k, v in self.payload.items())

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "payload_bytes": dict(self.payload),
                "payload_total": sum(self.payload.values()), "wire_bytes": self.wire_bytes(),
                "unrecognized_ops": sorted(self.unknown)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """The machine the numbers were taken on."""
    import psutil

    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("transformers", "peft", "accelerate", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            info[name] = None
    return info
