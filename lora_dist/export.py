"""Merged Hugging Face checkpoints: from a sharded training run, or offline from base + adapter.

* :func:`export_merged` is called by every rank after training. Each rank
  merges the base rows it already holds (FSDP2 ``Shard(0)`` rows, a ZeRO-3 flat
  partition, or its share of a replicated tensor) with the replicated LoRA
  A/B, and the result is a normal HF checkpoint dir that
  ``AutoModelForCausalLM.from_pretrained`` loads.
* :func:`merge_offline` streams a base checkpoint and a PEFT-format adapter
  into a merged checkpoint, one tensor (or row block) at a time; under
  torchrun/srun/mpirun the ranks split the work.
* :func:`verify_checkpoint` checks a checkpoint dir's files against its index
  and, given the base and adapter, recomputes a sample of tensors.

Design: files are planned up front and every rank writes its own bytes
-----------------------------------------------------------------------
A safetensors header needs only names, dtypes and shapes, which every rank
knows from the base checkpoint. So every rank computes the same layout (which
file, which byte offset for every tensor; :mod:`lora_dist.safetensors_writer`),
rank 0 creates the files with their headers at full size, and each rank
``pwrite``s its merged rows at their offsets. A dim-0 shard and a ZeRO-3 flat
partition are both one contiguous byte range of the row-major tensor, so no
rank ever sends a byte to another: zero communication, all ranks writing in
parallel, and each rank's extra memory is one merged block of its own shard.
The alternative - an owner rank per tensor collecting it from the others -
moves the whole model over the network once and serializes on the owners.

That needs a filesystem every rank sees (Lustre, GPFS, NFS, a single node's
disk). Where the output dir is node-local, rank 0 collects instead: it gathers
each sharded tensor's merged pieces (one tensor at a time, so rank 0 holds at
most the largest tensor) and writes every file itself, and the checkpoint ends
up on rank 0's node. ``mode="auto"`` (the default) picks between the two by
checking that every rank can see a probe file rank 0 wrote into the staging
dir; ``mode="shared"`` / ``"gather"`` force one.

Tensors without LoRA are copied from the base checkpoint files, not from the
sharded model: they are frozen, so the files hold exactly the values trained
against, at full precision even when training kept the base in bf16, and the
output then holds exactly the base's keys - tied weights (GPT-2 keeps only
``transformer.wte.weight``), persistent buffers and all - with no name mapping
from the model. LoRA-targeted weights come from the model's own shards.

The LoRA update is computed in fixed blocks of :data:`MERGE_BLOCK_ROWS` rows at
absolute row offsets, each through :func:`lora_dist.merge.merge_weight` (fp32,
NaN/Inf checked); a rank whose shard starts or ends inside a block pads it with
zeros and keeps its own part. The merged bytes therefore do not depend on how
the rows were sharded: on the same hardware, 1, 2 or 3 ranks, FSDP2 or ZeRO-3
and :func:`merge_offline` give identical files.

Writes are atomic: everything goes to a ``<out_dir>.tmp-XXXX`` sibling that is
fsynced and renamed into place at the end; an existing output is replaced only
with ``overwrite=True``, and only once the new one is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_dist import safetensors_writer as stw
from lora_dist.adapter import read_adapter
from lora_dist.model_dir import SAFE_INDEX, SAFE_SINGLE, ModelDir
from lora_dist.lora import LoRALinear, lora_modules
from lora_dist.merge import LoRAWeights, MergeError, lora_delta, merge_weight

__all__ = [
    "MERGE_BLOCK_ROWS",
    "ExportError",
    "OutputExistsError",
    "VerifyError",
    "VerifyReport",
    "add_merge_subparser",
    "add_verify_subparser",
    "export_merged",
    "merge_offline",
    "run_merge",
    "run_verify",
    "verify_checkpoint",
]

log = logging.getLogger("lora_dist.export")

#: Rows per block of the LoRA update; fixed so the merged bits do not depend on the sharding.
MERGE_BLOCK_ROWS = 1024
#: Largest piece of a copied tensor read at once.
COPY_BLOCK_BYTES = 256 * 2**20

_MODES = ("auto", "shared", "gather")
_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_PROBE = ".lora_dist_probe"
_MERGED_FROM = "lora_dist_merged_base_dtype"  # safetensors metadata: dtype(s) the merged base weights had
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")


class ExportError(RuntimeError):
    """A merged checkpoint could not be written."""


class OutputExistsError(ExportError, FileExistsError):
    """The output dir exists and overwriting was not asked for."""


class VerifyError(ValueError):
    """A checkpoint dir that is inconsistent, corrupt, or not the merge of its base and adapter."""


# ----------------------------------------------------------------------------- process group


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class _Group:
    """The default process group, or a stand-in for a single process."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0
        nccl = self.active and "nccl" in str(dist.get_backend()).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def broadcast(self, obj):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor] | None:
        """Gather equal-length uint8 tensors (on :attr:`device`) to rank 0; None elsewhere."""
        gathered = [torch.empty_like(payload) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(payload, gathered, dst=0)
        return gathered

    def check(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (the failing rank re-raises its own error)."""
        messages = self.all_gather(None if error is None else _describe(error))
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise ExportError(f"rank {rank} failed: {message}")

    def on_rank0(self, fn: Callable[[], object]):
        """Collective: run ``fn`` on rank 0, hand its result (or its failure) to every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:
                error = e
        status = self.broadcast((None, result) if error is None else (_describe(error), None))
        if error is not None:
            raise error
        if status[0] is not None:
            raise ExportError(f"rank 0 failed: {status[0]}")
        return status[1]


# ----------------------------------------------------------------------------- what each rank writes


def _merge_flat(
    flat: torch.Tensor,
    start: int,
    end: int,
    shape: tuple[int, ...],
    lora: LoRAWeights,
    out_dtype: torch.dtype,
    name: str,
) -> torch.Tensor:
    """Elements ``[start, end)`` of the merged, row-major flattened weight, given those elements of the base.

    The update is computed per :data:`MERGE_BLOCK_ROWS`-row block at absolute
    offsets; a partial block (a shard edge, a ZeRO-3 partition cutting a row)
    is padded with zeros, merged, and cut.
    """
    rows, row_len = shape[0], math.prod(shape[1:])
    lora = LoRAWeights(lora.lora_A.to(flat.device), lora.lora_B.to(flat.device), lora.scale, lora.fan_in_fan_out)
    out = torch.empty(end - start, dtype=out_dtype, device=flat.device)
    first, last = start // row_len, -(-end // row_len)
    b0 = first - first % MERGE_BLOCK_ROWS
    while b0 < last:
        b1 = min(b0 + MERGE_BLOCK_ROWS, rows)
        lo, hi = max(start, b0 * row_len), min(end, b1 * row_len)
        if lo == b0 * row_len and hi == b1 * row_len:
            block = flat[lo - start : hi - start]
        else:
            block = flat.new_zeros((b1 - b0) * row_len)
            block[lo - b0 * row_len : hi - b0 * row_len] = flat[lo - start : hi - start]
        merged = merge_weight(block.view(b1 - b0, row_len), lora, rows=slice(b0, b1), out_dtype=out_dtype, name=name)
        out[lo - start : hi - start] = merged.view(-1)[lo - b0 * row_len : hi - b0 * row_len]
        b0 = b1
    return out


@dataclass
class _Piece:
    """A flat element range ``[start, end)`` of one output tensor and how to produce it (in the output dtype)."""

    start: int
    end: int
    produce: Callable[[], torch.Tensor]


def _row_chunk(rows: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's rows under ``torch.chunk`` semantics (the last ranks may get fewer, or none)."""
    size = -(-rows // world) if rows else 0
    return min(rank * size, rows), min((rank + 1) * size, rows)


class _RowsSource:
    """A whole tensor every rank can read rows of: a base checkpoint tensor, or a replicated param.

    With a shared output every rank writes its ``torch.chunk`` share of the
    rows; when rank 0 collects, rank 0 writes all of them.
    """

    sharded = False

    def __init__(self, read_rows: Callable[[int, int], torch.Tensor], spec: stw.TensorSpec, lora: LoRAWeights | None):
        self.read_rows, self.spec, self.lora = read_rows, spec, lora

    def pieces(self, rank: int, world: int) -> list[_Piece]:
        shape = self.spec.shape
        if not shape:
            return [_Piece(0, 1, lambda: self.read_rows(0, 1).reshape(1).to(self.spec.dtype))] if rank == 0 else []
        row_len = math.prod(shape[1:])
        r0, r1 = _row_chunk(shape[0], world, rank)
        if self.lora is not None:
            step = MERGE_BLOCK_ROWS
        else:
            step = max(1, COPY_BLOCK_BYTES // max(1, row_len * self.spec.itemsize))
        pieces, a = [], r0
        while a < r1:
            b = min(r1, (a // step + 1) * step)
            pieces.append(_Piece(a * row_len, b * row_len, lambda a=a, b=b: self._produce(a, b)))
            a = b
        return pieces

    def _produce(self, a: int, b: int) -> torch.Tensor:
        flat = self.read_rows(a, b).reshape(-1)
        if self.lora is None:
            return flat.to(self.spec.dtype)
        row_len = math.prod(self.spec.shape[1:])
        return _merge_flat(flat, a * row_len, b * row_len, self.spec.shape, self.lora, self.spec.dtype, self.spec.name)


class _ShardSource:
    """This rank's fixed part of a sharded param: flat elements ``[start, end)`` it holds locally."""

    sharded = True

    def __init__(self, local: torch.Tensor, start: int, end: int, spec: stw.TensorSpec, lora: LoRAWeights | None):
        self.local, self.start, self.end, self.spec, self.lora = local, start, end, spec, lora

    def pieces(self, rank: int, world: int) -> list[_Piece]:
        return [_Piece(self.start, self.end, self._produce)] if self.end > self.start else []

    def _produce(self) -> torch.Tensor:
        if self.lora is None:
            return self.local.to(self.spec.dtype)
        spec = self.spec
        return _merge_flat(self.local, self.start, self.end, spec.shape, self.lora, spec.dtype, spec.name)


def _param_source(param: torch.Tensor, spec: stw.TensorSpec, lora: LoRAWeights | None):
    """Where this rank's rows of a (possibly sharded) model param are."""
    row_len = math.prod(spec.shape[1:])
    if _is_dtensor(param):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in param.placements):
            raise ExportError(
                f"{spec.name}: placements {param.placements} are not supported; the export handles "
                "dim-0 sharding (FSDP2's default Shard(0)) and replication"
            )
        local = param.to_local().detach()
        if all(isinstance(p, Replicate) for p in param.placements):
            return _RowsSource(lambda a, b: local[a:b], spec, lora)
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        rows = local_shape[0] if local_shape else 0
        start = offset[0] * row_len if rows else 0
        return _ShardSource(local.reshape(-1), start, start + rows * row_len, spec, lora)
    if hasattr(param, "ds_tensor"):
        # ZeRO-3: rank r of the param's group owns flat elements [r*P, (r+1)*P) of the padded param.
        group = getattr(param, "ds_process_group", None)
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        part = param.ds_tensor.detach().reshape(-1)
        if part.numel() * world < spec.numel:
            raise ExportError(f"{spec.name}: this rank's ZeRO-3 partition is not in memory (NVMe offload?); "
                              "export needs the partitions in GPU or CPU memory")
        start = min(rank * part.numel(), spec.numel)
        end = min(start + part.numel(), spec.numel)
        return _ShardSource(part[: end - start], start, end, spec, lora)
    full = param.detach()
    return _RowsSource(lambda a, b: full[a:b], spec, lora)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _global_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def _local_dtype(param: torch.Tensor) -> torch.dtype:
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.dtype
    return param.to_local().dtype if _is_dtensor(param) else param.dtype


# ----------------------------------------------------------------------------- writing


class _OpenFiles:
    """This rank's write handles on the staged files."""

    def __init__(self, root: Path, layout: stw.CheckpointLayout) -> None:
        self.root, self.layout = root, layout
        self.fds: dict[str, int] = {}

    def write(self, key: str, start: int, data: torch.Tensor) -> None:
        spec = self.layout.specs[key]
        if data.dtype != spec.dtype or start < 0 or start + data.numel() > spec.numel:  # pragma: no cover - internal
            raise ExportError(f"{key}: piece [{start}, {start + data.numel()}) {data.dtype} does not fit {spec}")
        name = self.layout.file_of[key]
        if name not in self.fds:
            self.fds[name] = os.open(self.root / name, os.O_WRONLY)
        stw.pwrite_tensor(self.fds[name], data, self.layout.offset_of[key] + start * spec.itemsize)

    def close(self) -> BaseException | None:
        """fsync and close everything; the first error, if any."""
        error = None
        for fd in self.fds.values():
            try:
                os.fsync(fd)
            except OSError as e:
                error = error or e
            finally:
                os.close(fd)
        self.fds.clear()
        return error


def _friendly(e: BaseException, out: Path, layout: stw.CheckpointLayout) -> BaseException:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        err = ExportError(
            f"no space left on the device of {out.parent} while writing the merged checkpoint "
            f"({stw.format_size(layout.file_bytes)} in all); free space or choose another output dir"
        )
        err.__cause__ = e
        return err
    return e


def _fill(group: _Group, staging: Path, layout: stw.CheckpointLayout, sources: Mapping[str, object],
          gather: bool, ranges: list[dict[str, list[tuple[int, int]]]], out: Path) -> BaseException | None:
    """Produce and write this rank's pieces; with ``gather`` rank 0 also collects the sharded ones.

    Errors are recorded, not raised, so every rank keeps taking part in the
    collectives; the caller raises them together afterwards.
    """
    files = _OpenFiles(staging, layout)
    error: BaseException | None = None
    for key, spec in layout.specs.items():
        source = sources[key]
        if gather and source.sharded:
            # One tensor at a time: every rank sends its merged bytes, rank 0 writes them.
            lengths = [sum(e - s for s, e in r.get(key, [])) * spec.itemsize for r in ranges]
            if max(lengths) == 0:
                continue
            payload = torch.zeros(max(lengths), dtype=torch.uint8, device=group.device)
            if error is None:
                try:
                    parts = [p.produce().reshape(-1).view(torch.uint8).to(group.device)
                             for p in source.pieces(group.rank, group.world)]
                    if parts:
                        joined = torch.cat(parts)
                        payload[: joined.numel()] = joined
                except Exception as e:
                    error = e
            gathered = group.gather_bytes(payload)
            if group.rank == 0 and error is None:
                try:
                    for rank, buf in enumerate(gathered):
                        cursor = 0
                        for s, e in ranges[rank].get(key, []):
                            n = (e - s) * spec.itemsize
                            files.write(key, s, buf[cursor : cursor + n].to("cpu").view(spec.dtype))
                            cursor += n
                except Exception as e:
                    error = e
            continue
        if error is not None or (gather and group.rank != 0):
            continue
        try:
            world, rank = (1, 0) if gather else (group.world, group.rank)
            for piece in source.pieces(rank, world):
                files.write(key, piece.start, piece.produce())
        except Exception as e:
            error = e
    close_error = files.close()
    error = error or close_error
    return _friendly(error, out, layout) if error is not None else None


def _check_coverage(layout: stw.CheckpointLayout, ranges: list[dict[str, list[tuple[int, int]]]]) -> None:
    """Every sharded tensor's ranges, over all ranks, must cover it with no gap."""
    keys = sorted({k for r in ranges for k in r})
    for key in keys:
        spans = sorted(span for r in ranges for span in r.get(key, []))
        cursor = 0
        for s, e in spans:
            if s > cursor:
                break
            cursor = max(cursor, e)
        if cursor < layout.specs[key].numel:
            raise ExportError(
                f"{key}: the ranks' shards cover elements up to {cursor} of {layout.specs[key].numel} "
                "(a gap); the model's sharding is not a dim-0 or ZeRO-3 flat partition over all ranks"
            )


def _exists(out: Path) -> OutputExistsError:
    return OutputExistsError(f"output {out} already exists; pass --overwrite (or output.overwrite=true) to replace it")


def _prepare_staging(out: Path, base_dir: Path, overwrite: bool, needed_bytes: int) -> tuple[str, str]:
    """Rank 0: refuse an existing output, check free space, create the staging dir with a probe file."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise _exists(out)
        if out.is_dir() and base_dir.exists() and os.path.samefile(out, base_dir):
            raise ExportError(f"output {out} is the base checkpoint itself; choose another output dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < needed_bytes:
        raise ExportError(
            f"not enough space for the merged checkpoint under {out.parent}: it needs "
            f"{stw.format_size(needed_bytes)}, {stw.format_size(free)} are free; free space or choose another output dir"
        )
    while True:  # not mkdtemp: the final dir should get the umask's permissions, not 0700
        staging = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
        try:
            staging.mkdir()
            break
        except FileExistsError:  # pragma: no cover
            continue
    token = secrets.token_hex(16)
    (staging / _PROBE).write_text(token)
    return str(staging), token


def _sees_probe(staging: Path, token: str) -> bool:
    for attempt in range(3):  # a shared filesystem may show a new dir with a short delay
        try:
            if (staging / _PROBE).read_text() == token:
                return True
        except OSError:
            pass
        time.sleep(0.2 * (attempt + 1))
    return False


def _choose_gather(group: _Group, staging: Path, token: str, mode: str) -> bool:
    """Collective: whether rank 0 collects (True) or every rank writes into the shared staging dir (False)."""
    if group.world == 1:
        return False
    if mode == "gather":
        return True
    sees = group.all_gather(_sees_probe(staging, token))
    blind = [r for r, ok in enumerate(sees) if not ok]
    if blind and mode == "shared":
        raise ExportError(
            f"ranks {blind} cannot see {staging.parent}, so it is not on a filesystem shared by all ranks; "
            "use mode='gather' (or 'auto') to have rank 0 write the checkpoint"
        )
    if blind and group.rank == 0:
        log.warning("ranks %s cannot see %s (node-local disks?): rank 0 collects the merged tensors and writes the "
                    "whole checkpoint on its own node", blind, staging.parent)
    return bool(blind)


def _create_files(staging: Path, layout: stw.CheckpointLayout) -> None:
    for shard in layout.files:
        stw.create_file(staging / shard.name, shard)


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json") or name.startswith("adapter_")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _finalize(staging: Path, out: Path, base_dir: Path, layout: stw.CheckpointLayout,
              config_dtype: torch.dtype | None, overwrite: bool) -> None:
    """Rank 0: index, config and tokenizer files, fsync, then rename the staging dir into place."""
    (staging / _PROBE).unlink(missing_ok=True)
    index = layout.index()
    if index is not None:
        _write_json(staging / SAFE_INDEX, index)
    config = json.loads((base_dir / "config.json").read_text())
    if config_dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for k in keys:
            config[k] = _dtype_name(config_dtype)
    _write_json(staging / "config.json", config)
    for f in sorted(base_dir.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name != "config.json" and not _is_weight_file(f.name):
            shutil.copyfile(f, staging / f.name)
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    stw.fsync_dir(staging)
    if out.exists() or out.is_symlink():
        if not overwrite:  # created by someone else while we were writing
            raise _exists(out)
        old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
        os.replace(out, old)
        os.replace(staging, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(staging, out)
    stw.fsync_dir(out.parent)


def _write_checkpoint(group: _Group, out_dir: str | os.PathLike, base: ModelDir, layout: stw.CheckpointLayout,
                      sources: Mapping[str, object], *, overwrite: bool, mode: str,
                      config_dtype: torch.dtype | None) -> Path:
    """Collective: stage, fill, finalize. See the module docstring for the protocol."""
    out = Path(out_dir).absolute()
    staging_s, token = group.on_rank0(lambda: _prepare_staging(out, base.path.absolute(), overwrite, layout.file_bytes))
    staging = Path(staging_s)
    try:
        gather = _choose_gather(group, staging, token, mode)
        local = {k: [(p.start, p.end) for p in s.pieces(group.rank, group.world)]
                 for k, s in sources.items() if s.sharded}
        everyone = group.all_gather((hashlib.sha256(layout.fingerprint().encode()).hexdigest(), local))
        if any(fp != everyone[0][0] for fp, _ in everyone):
            raise ExportError("ranks planned different checkpoints: the base checkpoint or the model differs "
                              "between ranks")
        ranges = [r for _, r in everyone]
        _check_coverage(layout, ranges)
        group.on_rank0(lambda: _create_files(staging, layout))
        group.check(_fill(group, staging, layout, sources, gather, ranges, out))
        group.on_rank0(lambda: _finalize(staging, out, base.path, layout, config_dtype, overwrite))
    except BaseException as e:
        if group.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        friendly = _friendly(e, out, layout)
        if friendly is not e:
            raise friendly from e
        raise
    return out


# ----------------------------------------------------------------------------- planning


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _FLOAT_DTYPES:
        return dtype
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name in ("auto", "none", ""):
            return None
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise ValueError(f"dtype {dtype!r} is not one of bf16, fp16, fp32 (or None to keep the base's dtypes)")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _output_specs(base: ModelDir, out_dtype: torch.dtype | None) -> dict[str, stw.TensorSpec]:
    """One spec per base tensor, in natural key order; floating tensors cast to ``out_dtype``."""
    specs = {}
    for key in sorted(base.keys(), key=_natural_key):
        dtype = stw.dtype_from_str(base.dtype(key))
        if out_dtype is not None and dtype in _FLOAT_DTYPES:
            dtype = out_dtype
        specs[key] = stw.TensorSpec(key, dtype, base.shape(key))
    return specs


def _file_rows(base: ModelDir, key: str) -> Callable[[int, int], torch.Tensor]:
    if not base.shape(key):
        return lambda a, b: base.read(key)
    return lambda a, b: base.read(key, rows=slice(a, b))


def _merged_from(dtypes) -> str:
    return ",".join(sorted({_dtype_name(d) for d in dtypes}))


def _unwrap(model: nn.Module) -> nn.Module:
    """The user model inside DDP / DeepSpeed engine / torch.compile wrappers."""
    while True:
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine"):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _lora_weights(layers: Mapping[str, LoRALinear]) -> dict[str, LoRAWeights]:
    """Collective: full copies of every layer's A/B (gathered if ZeRO-3 partitioned or DTensor-sharded)."""
    params = [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    zero = [p for p in params if hasattr(p, "ds_id")]
    if zero:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(zero, modifier_rank=None)
    else:
        gathered = contextlib.nullcontext()
    out = {}
    with gathered:
        for name, layer in layers.items():
            a, b = (p.full_tensor() if _is_dtensor(p) else p for p in (layer.lora_A.weight, layer.lora_B.weight))
            out[name] = LoRAWeights(a.detach().clone(), b.detach().clone(), layer.scale, layer.fan_in_fan_out)
    return out


# ----------------------------------------------------------------------------- public API


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    mode: str = "auto",
) -> Path:
    """Write the model with its LoRA merged in as a HF checkpoint dir. Collective: call on every rank.

    Works on a single process and on fsdp2 (``Shard(0)`` DTensors), zero3
    (DeepSpeed partitions) and ddp models; no rank materializes the model.

    Args:
        model: the trained model (a DDP / DeepSpeed engine wrapper is unwrapped).
        out_dir: the checkpoint dir to create.
        base_path: the base HF checkpoint the model was loaded from: its key
            names, non-LoRA tensors, config, generation config and tokenizer
            files are used.
        dtype: dtype of the floating tensors written (the merge itself is fp32);
            None keeps the base checkpoint's dtypes.
        max_shard_size: largest file, decimal units like HF ("5GB" = 5e9 bytes).
        overwrite: replace an existing ``out_dir`` (once the new one is complete).
        mode: "auto", "shared" (every rank writes its bytes into files on a
            filesystem all ranks see) or "gather" (rank 0 collects and writes).

    Returns:
        ``out_dir`` as an absolute path, on every rank.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ExportError: a LoRA weight the base does not have, an unsupported
            sharding, no disk space, or a failure on another rank.
        MergeError: a merged weight with NaN/Inf.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    group = _Group()
    model = _unwrap(model)
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # parameters back to their sharded DTensors, whatever the last forward left
    layers = dict(lora_modules(model))
    error = None
    try:
        out_dtype = parse_dtype(dtype)
        base = ModelDir(base_path)
        if not layers:
            raise ExportError("the model has no LoRA layers; inject_lora() it, or copy the base checkpoint instead")
        specs = _output_specs(base, out_dtype)
        for name in layers:
            if f"{name}.weight" not in specs:
                raise ExportError(
                    f"LoRA-adapted weight {name}.weight is not a tensor of the base checkpoint {base.path} "
                    "(a tied or renamed weight?); the merged export writes exactly the base's keys"
                )
    except Exception as e:
        error = e
    group.check(error)
    adapters = _lora_weights(layers)
    try:
        sources: dict[str, object] = {k: _RowsSource(_file_rows(base, k), s, None) for k, s in specs.items()}
        for name, layer in layers.items():
            key = f"{name}.weight"
            if _global_shape(layer.weight) != specs[key].shape:
                raise ExportError(
                    f"{key}: the model's weight is {_global_shape(layer.weight)} but the base checkpoint's is "
                    f"{specs[key].shape}; base_path is not the checkpoint the model was loaded from"
                )
            # A layer merged in place already holds W0 + delta.
            sources[key] = _param_source(layer.weight, specs[key], None if layer.merged else adapters[name])
        merged_from = _merged_from(_local_dtype(layer.weight) for layer in layers.values())
        layout = stw.plan_layout(list(specs.values()), max_shard_size, {"format": "pt", _MERGED_FROM: merged_from})
    except Exception as e:
        error = e
    group.check(error)
    return _write_checkpoint(group, out_dir, base, layout, sources, overwrite=overwrite, mode=mode,
                             config_dtype=out_dtype)


def merge_offline(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    *,
    mode: str = "auto",
) -> Path:
    """Merge a PEFT-format LoRA adapter into a base HF checkpoint, streaming, into a new checkpoint dir.

    Reads the base one tensor (or row block of at most 256 MiB) at a time.
    When torch.distributed is initialized with more than one rank (torchrun,
    srun, mpirun), every rank merges and writes its share of every tensor's
    rows in parallel; call it on every rank.

    Args:
        base_dir: the base checkpoint dir.
        adapter_dir: a PEFT-format adapter (PEFT's own or ``save_adapter``'s;
            rsLoRA, ``fan_in_fan_out``, ``rank_pattern``/``alpha_pattern``).
        out_dir: the checkpoint dir to create.
        max_shard_size: largest file, decimal units like HF ("5GB" = 5e9 bytes).
        dtype: dtype of the floating tensors written; None keeps the base's.
        overwrite: replace an existing ``out_dir``.
        mode: as for :func:`export_merged`.

    Raises:
        OutputExistsError, ExportError, MergeError, AdapterError, ModelDirError.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    group = _Group()
    error = None
    try:
        out_dtype = parse_dtype(dtype)
        base = ModelDir(base_dir)
        weights = read_adapter(adapter_dir).weights()
        missing = sorted(m for m in weights if f"{m}.weight" not in base)
        if missing:
            raise MergeError(f"the adapter targets modules that are not in the base checkpoint: {missing[:5]}; "
                             "the adapter was trained on a different base")
        specs = _output_specs(base, out_dtype)
        sources = {}
        for key, spec in specs.items():
            lora = weights.get(key[: -len(".weight")]) if key.endswith(".weight") else None
            sources[key] = _RowsSource(_file_rows(base, key), spec, lora)
        merged_from = _merged_from(stw.dtype_from_str(base.dtype(f"{m}.weight")) for m in weights)
        layout = stw.plan_layout(list(specs.values()), max_shard_size, {"format": "pt", _MERGED_FROM: merged_from})
    except Exception as e:
        error = e
    group.check(error)
    return _write_checkpoint(group, out_dir, base, layout, sources, overwrite=overwrite, mode=mode,
                             config_dtype=out_dtype)


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` checked."""

    path: Path
    files: list[str]
    tensors: int
    total_size: int
    dtypes: dict[str, int]
    compared: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0

    def summary(self) -> str:
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        line = (f"{self.path}: OK - {self.tensors} tensors ({dtypes}), {self.total_size / 1e6:.1f} MB "
                f"in {len(self.files)} file(s), all finite")
        if self.compared:
            line += f"; {len(self.compared)} tensors match base + adapter (max |diff| {self.max_abs_diff:.3g})"
        return line


def _tolerance(out_dtype: torch.dtype, merged_from: str) -> tuple[float, float] | None:
    """``(rtol, atol)`` for comparing a recomputed merge, or None for exact."""
    dtypes = {out_dtype} | {_DTYPE_NAMES.get(n, torch.float32) for n in merged_from.split(",") if n}
    if torch.bfloat16 in dtypes:
        return 1.6e-2, 1e-5
    if torch.float16 in dtypes:
        return 1e-3, 1e-5
    return None


def _fp32_merge_bound(ref: torch.Tensor, lora: LoRAWeights) -> torch.Tensor:
    """How far two correct fp32 merges of one tensor can differ, element by element.

    ``W0 + scale * B @ A`` rounds once in the add and once in the scale; the r-term sums of
    ``B @ A`` may run in another order on another device (a GPU's matmul), each within ``r``
    roundings of ``|B| @ |A|``. Twice these (one per merge) bounds the difference, so a merge
    done on a GPU verifies on a CPU while a wrong scale, adapter or base does not.
    """
    eps = torch.finfo(torch.float32).eps
    magnitude = lora_delta(lora.lora_A.abs(), lora.lora_B.abs(), abs(lora.scale), lora.fan_in_fan_out).double()
    return 2 * eps * ref.double().abs() + 2 * (lora.r + 1) * eps * magnitude.view(ref.shape)


def _sample_keys(keys: list[str], targeted: set[str], sample: int | None) -> list[str]:
    """All LoRA-targeted keys (up to ``sample``), then others spread evenly over the rest."""
    lora_keys = [k for k in keys if k in targeted]
    others = [k for k in keys if k not in targeted]
    if sample is None:
        return lora_keys + others
    chosen = lora_keys[:sample]
    room = sample - len(chosen)
    if room > 0 and others:
        step = len(others) / min(room, len(others))
        chosen += [others[int(i * step)] for i in range(min(room, len(others)))]
    return chosen


def verify_checkpoint(
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    sample: int | None = 8,
) -> VerifyReport:
    """Check a HF safetensors checkpoint dir, and optionally that it is ``base + adapter``.

    Always: ``config.json`` parses; the index and the files agree (every tensor
    in exactly one file, where the index says, ``total_size`` right, no stray
    weight files); every header is valid for its file size; no tensor holds
    NaN/Inf. With ``base_dir``: the same keys and shapes as the base. With
    ``base_dir`` and ``adapter_dir``: ``sample`` tensors (every LoRA-targeted
    one first, up to ``sample``; ``None`` for all) are recomputed with the
    export's merge and compared: untouched tensors bit-exact; merged fp32
    tensors within the merge's own rounding (a GPU may sum ``B @ A`` in another
    order); bf16/fp16 within their rounding, which also applies when the export
    merged base weights held in bf16/fp16 (it records their dtype in the
    safetensors metadata key ``lora_dist_merged_base_dtype``).

    Raises:
        VerifyError: listing every problem found.
    """
    out = Path(out_dir)
    if adapter_dir is not None and base_dir is None:
        raise ValueError("verifying against an adapter needs the base checkpoint too (base_dir)")
    problems: list[str] = []

    def fail() -> VerifyError:
        return VerifyError(f"{out} failed verification:\n" + "\n".join(f"  - {p}" for p in problems))

    if not out.is_dir():
        problems.append("not a directory")
        raise fail()
    try:
        json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        problems.append(f"config.json is missing or not valid JSON ({e})")
    index_path = out / SAFE_INDEX
    weight_map: dict[str, str] = {}
    declared_total = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
            declared_total = index.get("metadata", {}).get("total_size")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            problems.append(f"{SAFE_INDEX} is corrupt ({e})")
        files = sorted(set(weight_map.values()))
    elif (out / SAFE_SINGLE).is_file():
        files = [SAFE_SINGLE]
    else:
        problems.append(f"no {SAFE_INDEX} and no {SAFE_SINGLE}")
        raise fail()
    stray = sorted(p.name for p in out.glob("*.safetensors") if p.name not in files)
    if stray:
        problems.append(f"weight files not in the index: {stray}")
    entries: dict[str, tuple[str, stw.HeaderEntry]] = {}
    metadata: dict[str, str] = {}
    for name in files:
        path = out / name
        if not path.is_file():
            problems.append(f"{name} is listed in the index but missing")
            continue
        try:
            metadata, header = stw.read_header(path)
        except stw.SafetensorsFormatError as e:
            problems.append(str(e))
            continue
        for key, entry in header.items():
            if key in entries:
                problems.append(f"{key!r} is stored twice, in {entries[key][0]} and {name}")
            entries[key] = (name, entry)
    if index_path.is_file() and weight_map:
        for key, name in weight_map.items():
            if key not in entries and (out / name).is_file():
                problems.append(f"{key!r} is in the index (-> {name}) but in no file")
            elif key in entries and entries[key][0] != name:
                problems.append(f"{key!r} is in {entries[key][0]} but the index says {name}")
        for key in sorted(set(entries) - set(weight_map)):
            problems.append(f"{key!r} is in {entries[key][0]} but not in the index")
    total = sum(e.end - e.begin for _, e in entries.values())
    if declared_total is not None and declared_total != total:
        problems.append(f"index metadata.total_size is {declared_total} but the tensors hold {total} bytes")
    if problems:
        raise fail()

    ckpt = ModelDir(out)
    dtypes: dict[str, int] = {}
    for key in sorted(entries, key=_natural_key):
        dtypes[entries[key][1].dtype] = dtypes.get(entries[key][1].dtype, 0) + 1
        tensor = ckpt.read(key)
        if tensor.dtype in _FLOAT_DTYPES and not torch.isfinite(tensor).all():
            problems.append(f"{key!r} holds NaN/Inf")
    report = VerifyReport(out, files, len(entries), total, dtypes)

    if base_dir is not None:
        base = ModelDir(base_dir)
        missing, extra = sorted(set(base.keys()) - set(entries)), sorted(set(entries) - set(base.keys()))
        if missing:
            problems.append(f"{len(missing)} base tensors are missing: {missing[:5]}")
        if extra:
            problems.append(f"{len(extra)} tensors are not in the base: {extra[:5]}")
        for key in sorted(set(base.keys()) & set(entries)):
            if tuple(entries[key][1].shape) != base.shape(key):
                problems.append(f"{key!r} has shape {entries[key][1].shape}, the base {base.shape(key)}")
        weights = read_adapter(adapter_dir).weights() if adapter_dir is not None else {}
        targeted = {f"{m}.weight": w for m, w in weights.items()}
        absent = sorted(set(targeted) - set(entries))
        if absent:
            problems.append(f"LoRA-targeted tensors are missing: {absent[:5]}")
        if adapter_dir is not None and not problems:
            merged_from = metadata.get(_MERGED_FROM, "")
            keys = sorted(entries, key=_natural_key)
            for key in _sample_keys(keys, set(targeted), sample):
                got, w0 = ckpt.read(key), base.read(key)
                lora = targeted.get(key)
                if lora is None:
                    ref, tol = w0.to(got.dtype), None
                else:
                    ref = _merge_flat(w0.reshape(-1), 0, w0.numel(), tuple(w0.shape), lora, got.dtype, key)
                    ref, tol = ref.view(got.shape), _tolerance(got.dtype, merged_from)
                error = (got.double() - ref.double()).abs()
                diff = error.max().item() if got.numel() else 0.0
                report.max_abs_diff = max(report.max_abs_diff, diff)
                if lora is None:
                    ok = torch.equal(got, ref)  # copied, not computed: bit-exact
                elif tol is None:
                    ok = bool((error <= _fp32_merge_bound(ref, lora)).all())
                else:
                    # Rounding the result, or the base weight before the merge, errs relative to either size.
                    rtol, atol = tol
                    ok = bool((error <= atol + rtol * torch.maximum(ref.double().abs(), w0.double().abs())).all())
                if not ok:
                    kind = "base + adapter" if lora is not None else "the base"
                    problems.append(f"{key!r} differs from {kind} (max |diff| {diff:.3g})")
                report.compared.append(key)
    if problems:
        raise fail()
    return report


# ----------------------------------------------------------------------------- CLI glue


def add_merge_subparser(subparsers) -> argparse.ArgumentParser:
    """``lora-dist merge --base B --adapter A --out O [--max-shard-size 5GB] [--dtype bf16] [--overwrite]``."""
    p = subparsers.add_parser(
        "merge",
        help="merge a PEFT-format LoRA adapter into a base checkpoint (streaming, no full load)",
        description="Merge a PEFT-format LoRA adapter into a base Hugging Face checkpoint, one tensor at a time. "
        "Under torchrun/srun/mpirun the ranks split the work.",
    )
    p.add_argument("--base", required=True, help="base HF checkpoint dir (safetensors)")
    p.add_argument("--adapter", required=True, help="PEFT-format adapter dir")
    p.add_argument("--out", required=True, help="output checkpoint dir (must not exist unless --overwrite)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file, decimal units like HF (default 5GB)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                   help="dtype of the floating tensors written (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.set_defaults(func=run_merge)
    return p


def run_merge(args: argparse.Namespace) -> int:
    """Run ``lora-dist merge``; returns the exit code (2 with a one-line error on bad input, like every command).

    Under torchrun/srun/mpirun with more than one rank it joins the world
    (gloo: the merge is file work) unless the caller already did.
    """
    from lora_dist.launch import destroy_distributed, detect_launch_env, init_distributed

    started = not dist.is_initialized() and detect_launch_env().distributed
    if started:
        init_distributed(backend="gloo")
    try:
        out = merge_offline(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size,
                            dtype=args.dtype, overwrite=args.overwrite)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"merged checkpoint written to {out}")
        return 0
    except (ExportError, ValueError) as e:  # MergeError, AdapterError and ModelDirError are ValueErrors
        print(f"lora-dist merge: error: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            destroy_distributed()


def add_verify_subparser(subparsers) -> argparse.ArgumentParser:
    """``lora-dist verify OUT_DIR [--base BASE_DIR --adapter ADAPTER_DIR] [--sample N]``."""
    p = subparsers.add_parser(
        "verify",
        help="check a merged checkpoint dir (index, headers, NaN/Inf; optionally against base + adapter)",
        description="Check a Hugging Face safetensors checkpoint dir. With --base and --adapter, recompute a "
        "sample of tensors (all LoRA-targeted ones first) and compare.",
    )
    p.add_argument("out_dir", help="checkpoint dir to check")
    p.add_argument("--base", default=None, help="base checkpoint dir it was made from")
    p.add_argument("--adapter", default=None, help="adapter dir it was merged with (needs --base)")
    p.add_argument("--sample", type=int, default=8, help="tensors to recompute (0: none; -1: all)")
    p.set_defaults(func=run_verify)
    return p


def run_verify(args: argparse.Namespace) -> int:
    """Run ``lora-dist verify``: print a summary; exit code 1 on any problem."""
    sample = None if args.sample is not None and args.sample < 0 else args.sample
    try:
        report = verify_checkpoint(args.out_dir, args.base, args.adapter, sample=sample)
    except (ValueError, OSError) as e:  # VerifyError, AdapterError and ModelDirError are ValueErrors
        print(f"lora-dist verify: FAILED: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
