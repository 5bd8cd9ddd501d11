"""Writing a planned checkpoint collectively: stage, fill, check coverage, publish.

Every rank holds the same :class:`~lora_dist.export.layout.CheckpointLayout`
and a source for every tensor (:mod:`lora_dist.export.sources`).
:func:`write_checkpoint` runs the protocol the package docstring
(:mod:`lora_dist.export`) describes: rank 0 creates a staging dir next to the
output (:class:`lora_dist.atomic.WriterMark`: a dir marked as this live writer's,
so that the next export removes it if this one is killed) with a probe file in it, the ranks
decide whether they all see it (every rank writes its own bytes) or not (rank 0
collects), rank 0 creates the files with their headers, the ranks fill them,
and rank 0 adds index, config and tokenizer files and publishes the dir
(:func:`lora_dist.atomic.publish_dir`). A failure on any rank fails every rank
and removes the staging dir.

What may be written where is :mod:`lora_dist.export.target`'s rule: rank 0
checks it before creating anything and again just before publishing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

import torch

from lora_dist.atomic import WriterMark, publish_dir, recover, sweep_abandoned
from lora_dist.dtypes import FP8_DTYPES, dtype_name
from lora_dist.export import layout as st
from lora_dist.export.errors import ExportError
from lora_dist.ranks import RankGroup
from lora_dist.export.target import GENERATION_CONFIG, check_output, copied_files
from lora_dist.outputs import CHAT_TEMPLATE_FILE
from lora_dist.model_dir import SAFE_INDEX, ModelDir

__all__ = ["MODES", "PROBE", "check_coverage", "choose_gather", "sees_probe", "write_checkpoint"]

log = logging.getLogger(__name__)

#: How the ranks write: decided by the probe file, every rank into a shared dir, or rank 0 collecting.
MODES = ("auto", "shared", "gather")
#: The file rank 0 writes into the staging dir for the other ranks to look for.
PROBE = ".lora_dist_probe"
#: Write errors that mean the output's filesystem refuses writes (read-only, permissions).
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)

#: Per rank: tensor name -> the flat element ranges of that sharded tensor the rank produces.
Ranges = list[dict[str, list[tuple[int, int]]]]


class _OpenFiles:
    """This rank's write handles on the staged files, written behind: a piece is written by one background thread
    while the rank reads and merges the next (``pwrite`` and torch's kernels release the GIL), so an export takes
    about as long as its writes or its merging, whichever is longer, not their sum.

    The piece being written and the one being produced hold together at most ``budget`` bytes (this rank's largest
    piece, which writing in turn holds alone): :meth:`make_room` is called before a piece is produced and waits
    for the write in flight where both would not fit, so two large pieces (an embedding and a head copied from the
    base) are written in turn, and the export's peak grows by no more than one merged block's fp32 temporaries
    (the budget counts a piece's written bytes).

    A write's error (disk full, a read-only filesystem) is raised by the next :meth:`make_room` or :meth:`write`,
    or returned by :meth:`close`.
    """

    def __init__(self, root: Path, layout: st.CheckpointLayout, budget: int = 0) -> None:
        self.root, self.layout, self.budget = root, layout, budget
        self.fds: dict[str, int] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._pending_bytes = 0

    def make_room(self, nbytes: int) -> None:
        """Before producing a piece of ``nbytes``: wait for the write in flight unless both fit the budget."""
        if self._pending is not None and self._pending_bytes + nbytes > self.budget:
            self._wait()

    def write(self, key: str, start: int, data: torch.Tensor) -> None:
        spec = self.layout.specs[key]
        if data.dtype != spec.dtype or start < 0 or start + data.numel() > spec.numel:  # pragma: no cover - internal
            raise ExportError(f"{key}: piece [{start}, {start + data.numel()}) {data.dtype} does not fit {spec}")
        name = self.layout.file_of[key]
        if name not in self.fds:
            self.fds[name] = os.open(self.root / name, os.O_WRONLY)
        # On the host here, so the writer thread only writes (a device tensor is copied on this thread's stream).
        data = data.detach().to("cpu").contiguous()
        self._wait()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora_dist-export-write")
        self._pending_bytes = data.numel() * spec.itemsize
        self._pending = self._writer.submit(_write_piece, [data], self.fds[name],
                                            self.layout.offset_of[key] + start * spec.itemsize)

    def _wait(self) -> None:
        """Wait for the piece being written; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, sync: bool = True) -> BaseException | None:
        """Finish the writes, then fsync (from this rank: its own writes on a shared filesystem; not where the
        export is abandoned, ``sync=False``) and close everything; the first error (a network filesystem reports
        a failed write at the close)."""
        error = None
        try:
            self._wait()
        except Exception as e:
            error = e
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
        for fd in self.fds.values():
            try:
                if sync:
                    os.fsync(fd)
            except OSError as e:
                error = error or e
            finally:
                try:
                    os.close(fd)
                except OSError as e:
                    error = error or e
        self.fds.clear()
        return error


def _write_piece(holder: list[torch.Tensor], fd: int, offset: int) -> None:
    """The writer thread's job: write the piece, and drop it before the job counts as done. The executor keeps a
    job's arguments until after its future is resolved, so a piece passed directly could still be alive when the
    rank, its write waited for, produces the next one (the bench saw two 98 MB pieces live at once)."""
    data = holder.pop()
    try:
        st.pwrite_tensor(fd, data, offset)
    finally:
        del data


def _unwritable(e: OSError, out: Path) -> ExportError:
    where = f": {e.filename}" if e.filename and Path(e.filename) != out.parent else ""
    err = ExportError(f"cannot write the merged checkpoint under {out.parent} ({e.strerror or e}{where}); choose an "
                      "output dir on a writable filesystem, or fix its permissions")
    err.__cause__ = e
    return err


def _friendly(e: BaseException, out: Path, total_bytes: int) -> BaseException:
    """A disk-full or unwritable-filesystem error as one line naming the fix; other errors unchanged."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        err = ExportError(
            f"no space left on the device of {out.parent} while writing the merged checkpoint "
            f"({st.format_size(total_bytes)} in all); free space or choose another output dir"
        )
        err.__cause__ = e
        return err
    if isinstance(e, OSError) and e.errno in _UNWRITABLE:
        return _unwritable(e, out)
    return e


def _fill(group: RankGroup, staging: Path, layout: st.CheckpointLayout, sources: Mapping[str, object],
          gather: bool, ranges: Ranges, out: Path) -> BaseException | None:
    """Produce and write this rank's pieces; with ``gather`` rank 0 also collects the sharded ones.

    Errors are recorded, not raised, so every rank keeps taking part in the
    collectives; the caller raises them together afterwards.
    """
    world, rank = (1, 0) if gather else (group.world, group.rank)
    largest = max(((p.end - p.start) * layout.specs[k].itemsize for k, s in sources.items()
                   if not (gather and s.sharded) for p in s.pieces(rank, world)), default=0)
    files = _OpenFiles(staging, layout, budget=largest)
    try:
        error = _write_pieces(files, group, layout, sources, gather, ranges)
    except BaseException:  # interrupted, or a collective failed: the staging dir is removed, nothing to fsync
        files.close(sync=False)
        raise
    # Every piece handed to the writer thread written, or failed, before going on; a failed export is not synced.
    close_error = files.close(sync=error is None)
    error = error or close_error
    return _friendly(error, out, layout.file_bytes) if error is not None else None


def _write_pieces(files: _OpenFiles, group: RankGroup, layout: st.CheckpointLayout, sources: Mapping[str, object],
                  gather: bool, ranges: Ranges) -> BaseException | None:
    """:func:`_fill`'s pieces, tensor by tensor; the first error."""
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
                files.make_room((piece.end - piece.start) * spec.itemsize)
                files.write(key, piece.start, piece.produce())
        except Exception as e:
            error = e
    return error


def check_coverage(layout: st.CheckpointLayout, ranges: Ranges) -> None:
    """Every sharded tensor's ranges, over all ranks, must cover it with no gap.

    Args:
        layout: the planned checkpoint.
        ranges: per rank, the flat element ranges of each sharded tensor it produces.

    Raises:
        ExportError: naming the first tensor with a gap.
    """
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


def _repair(out: Path) -> None:
    """Rank 0: undo what a killed export of ``out`` left: the previous export set aside between the two renames
    of a replace is put back, staging dirs whose writer died are removed (a live writer's are kept)."""
    try:
        if recover(out, cleanup=False):
            log.warning("%s: put back the previous export, which a killed export had set aside", out)
        for staging in sweep_abandoned(out):
            log.warning("removed %s, left by a killed export of %s", staging, out)
    except OSError as e:  # a read-only or odd filesystem: check_output and the staging dir say what is wrong
        log.debug("no repair of %s: %s", out, e)


def _prepare_staging(out: Path, base_dir: Path, overwrite: bool, needed_bytes: int, inputs: list, what: str,
                     marks: list[WriterMark]) -> tuple[str, str]:
    """Rank 0: refuse an output the export may not write, check free space, create the staging dir (marked as
    this writer's: the mark is appended to ``marks``, released by the caller) with a probe."""
    _repair(out)  # first: a previous export put back is refused without overwrite, as any existing one
    check_output(out, inputs, overwrite=overwrite, base_dir=base_dir, what=what)
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if 0 < free < needed_bytes:  # some network filesystems report 0 free: let the writes themselves decide
            raise ExportError(
                f"not enough space for the merged checkpoint under {out.parent}: it needs "
                f"{st.format_size(needed_bytes)}, {st.format_size(free)} are free; free space or choose another "
                "output dir"
            )
        mark = WriterMark(out)
        marks.append(mark)
        staging = mark.staging
        token = secrets.token_hex(16)
        (staging / PROBE).write_text(token)
    except OSError as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        friendly = _friendly(e, out, needed_bytes)
        raise (friendly if friendly is not e else _unwritable(e, out)) from None
    return str(staging), token


def sees_probe(staging: Path, token: str) -> bool:
    """Whether this rank can read rank 0's probe file in ``staging`` (retried briefly: a shared filesystem
    may show a new dir with a short delay)."""
    for attempt in range(3):
        try:
            if (staging / PROBE).read_text() == token:
                return True
        except OSError:
            pass
        time.sleep(0.2 * (attempt + 1))
    return False


def choose_gather(group: RankGroup, staging: Path, token: str, mode: str) -> bool:
    """Collective: whether rank 0 collects (True) or every rank writes into the shared staging dir (False).

    Args:
        group: the ranks.
        staging: the staging dir rank 0 created.
        token: the content of rank 0's probe file.
        mode: one of :data:`MODES`.

    Raises:
        ExportError: ``mode="shared"`` and some rank cannot see the staging dir.
    """
    if group.world == 1:
        return False
    if mode == "gather":
        return True
    sees = group.all_gather(sees_probe(staging, token))
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


def _create_files(staging: Path, layout: st.CheckpointLayout) -> None:
    for shard in layout.files:
        st.create_file(staging / shard.name, shard)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _check_staged(staging: Path, layout: st.CheckpointLayout) -> None:
    """Every planned file is in the staging dir at its planned size (nothing removed it while the ranks wrote:
    a sweep on a node whose ``flock`` is node-local, a user's ``rm``), so what is published is whole."""
    for shard in layout.files:
        path = staging / shard.name
        size = path.stat().st_size if path.is_file() else None
        if size != shard.size:
            raise ExportError(f"{shard.name} is {'missing' if size is None else f'{size} bytes, not {shard.size}'} "
                              f"in the staging dir {staging} (another process removed or changed it?); nothing was "
                              "published: run the export again")


def _generation_config(base_dir: Path, chat_template: str | None) -> dict | None:
    """The base's generation config with ``eos_token_id`` listing what training taught a reply to end with under the
    template the export carries (``chat_template``, else the base tokenizer's own): its end-of-turn tokens
    (:func:`lora_dist.chat.reply_stops`, where ``lora-dist generate`` stops). transformers' ``generate`` and servers
    (vLLM) stop at these ids; a Qwen2.5 or Llama-3 base lists only its end of text, so a model fine-tuned on chats
    would write past its reply. None where nothing is added (the base lists them, it has no template or tokenizer,
    its generation config is unreadable: copied as it is)."""
    from lora_dist.chat import reply_stops, resolve_template, token_ids
    from lora_dist.data import load_tokenizer
    from lora_dist.model_dir import ModelDir, ModelDirError

    try:
        tokenizer = load_tokenizer(base_dir)
        template = chat_template or resolve_template(tokenizer)
        if template is None:
            return None
        path = base_dir / GENERATION_CONFIG
        if path.is_file():
            config = json.loads(path.read_text())
        else:  # what transformers derives from config.json when the file is missing (never running the dir's code)
            from transformers import GenerationConfig

            config = GenerationConfig.from_model_config(ModelDir(base_dir).hf_config).to_diff_dict()
    except (ModelDirError, OSError, ValueError):
        return None
    if not isinstance(config, dict):  # not a generation config transformers reads: left as it is
        return None
    given = config.get("eos_token_id")
    if not (given is None or isinstance(given, (int, list)) and all(isinstance(i, int) for i in token_ids(given))):
        return None
    stops = reply_stops(tokenizer, template, given)
    if stops == token_ids(given):
        return None
    config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    return config


def _finalize(staging: Path, out: Path, base_dir: Path, layout: st.CheckpointLayout,
              config_dtype: torch.dtype | None, overwrite: bool, inputs: list, what: str,
              chat_template: str | None) -> None:
    """Rank 0: index, config and tokenizer files (with ``chat_template``, the one training used), then publish the
    staging dir as ``out`` (checked again first: something may have appeared there while the ranks were writing)."""
    (staging / PROBE).unlink(missing_ok=True)
    index = layout.index()
    if index is not None:
        _write_json(staging / SAFE_INDEX, index)
    config = json.loads((base_dir / "config.json").read_text())
    if not any(spec.dtype in FP8_DTYPES for spec in layout.specs.values()):  # every weight is written dense
        config.pop("quantization_config", None)  # (else an FP8 base written as stored: lora_dist.export.sources)
    if config_dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for k in keys:
            config[k] = dtype_name(config_dtype)
    _write_json(staging / "config.json", config)
    for f in copied_files(base_dir):  # named chat templates in their subdir, as transformers reads them
        target = staging / f.relative_to(base_dir)
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(f, target)
    if chat_template is not None:  # transformers reads this file before tokenizer_config.json's template
        (staging / CHAT_TEMPLATE_FILE).write_text(chat_template)
    generation = _generation_config(base_dir, chat_template)
    if generation is not None:
        _write_json(staging / GENERATION_CONFIG, generation)
    check_output(out, inputs, overwrite=overwrite, base_dir=base_dir, what=what)
    _check_staged(staging, layout)
    try:
        publish_dir(staging, out, replace=overwrite)
    except FileExistsError:  # created by someone else in the last moment
        check_output(out, inputs, overwrite=False, base_dir=base_dir, what=what)
        raise


def write_checkpoint(group: RankGroup, out_dir: str | os.PathLike, base: ModelDir, layout: st.CheckpointLayout,
                     sources: Mapping[str, object], *, overwrite: bool, mode: str,
                     config_dtype: torch.dtype | None, inputs: Iterable[str | os.PathLike | None] = (),
                     what: str = "output dir", chat_template: str | None = None) -> Path:
    """Collective: stage, fill, publish a planned checkpoint. Call on every rank with the same plan.

    Args:
        group: the ranks.
        out_dir: the checkpoint dir to create.
        base: the base checkpoint (config, tokenizer and other non-weight files are copied from it).
        layout: the planned files, the same on every rank.
        sources: for every tensor of ``layout``, a :class:`~lora_dist.export.sources.RowsSource` or
            :class:`~lora_dist.export.sources.ShardSource`.
        overwrite: replace an existing ``out_dir`` once the new one is complete, if it is a merged
            checkpoint lora_dist wrote (:func:`~lora_dist.export.target.check_output`).
        mode: one of :data:`MODES`.
        config_dtype: the dtype to write into ``config.json``; None keeps the base's.
        inputs: what the export reads besides ``base`` (an adapter, a run's checkpoints): ``out_dir`` may
            neither be, contain nor lie inside any of them.
        what: how ``out_dir`` is named in errors (``--out``).
        chat_template: the chat template training rendered its data with, written as ``chat_template.jinja``
            (in place of the base's); None: the base's tokenizer files alone.

    Returns:
        ``out_dir`` as an absolute path, on every rank.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False.
        OutputRefusedError: ``out_dir`` is (or contains, or lies inside) an input, or exists and is not a
            merged checkpoint lora_dist wrote.
        ExportOverflowError: a tensor is not finite in the dtype it would be written in.
        ExportError: no disk space, an unwritable filesystem, the ranks planned different checkpoints, their
            shards leave a gap, or a failure on another rank.
    """
    out = Path(out_dir).absolute()
    base_dir = base.path.absolute()
    inputs = [base_dir, *(Path(p) for p in inputs if p is not None)]
    marks: list[WriterMark] = []
    try:
        return _write(group, out, base_dir, layout, sources, overwrite, mode, config_dtype, inputs, what, marks,
                      chat_template)
    finally:
        for mark in marks:
            mark.release()


def _write(group: RankGroup, out: Path, base_dir: Path, layout: st.CheckpointLayout, sources: Mapping[str, object],
           overwrite: bool, mode: str, config_dtype: torch.dtype | None, inputs: list, what: str,
           marks: list[WriterMark], chat_template: str | None) -> Path:
    staging_s, token = group.on_rank0(
        lambda: _prepare_staging(out, base_dir, overwrite, layout.file_bytes, inputs, what, marks))
    staging = Path(staging_s)
    try:
        gather = choose_gather(group, staging, token, mode)
        local = {k: [(p.start, p.end) for p in s.pieces(group.rank, group.world)]
                 for k, s in sources.items() if s.sharded}
        everyone = group.all_gather((hashlib.sha256(layout.fingerprint().encode()).hexdigest(), local))
        if any(fp != everyone[0][0] for fp, _ in everyone):
            raise ExportError("ranks planned different checkpoints: the base checkpoint or the model differs "
                              "between ranks")
        ranges = [r for _, r in everyone]
        check_coverage(layout, ranges)
        group.on_rank0(lambda: _create_files(staging, layout))
        filled = _fill(group, staging, layout, sources, gather, ranges, out)
        # Each rank ends its writes with an fsync: rank 0's, of everything under gather, can take minutes;
        # the others wait for it as long as that takes, not parallel.timeout_s.
        (RankGroup(patient=True) if group.group is None else group).check(filled)
        group.on_rank0(lambda: _finalize(staging, out, base_dir, layout, config_dtype, overwrite, inputs, what,
                                         chat_template))
    except BaseException as e:
        if group.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        friendly = _friendly(e, out, layout.file_bytes)
        if friendly is not e:
            raise friendly from e
        raise
    return out
