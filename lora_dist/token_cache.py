"""Tokenize once: packed blocks built in parallel into a memory-mapped cache every rank and restart reuses.

An entry is a dir ``<cache_dir>/<key>/`` holding the training blocks, ``input_ids.bin``, ``labels.bin``,
``position_ids.bin`` (``n_blocks x seq_len`` int32, native byte order) and ``lengths.bin`` (``n_blocks``
int32), the held-out blocks likewise as ``eval_*.bin`` where ``eval_fraction`` holds some out, plus
``meta.json`` (the key, the shapes, the byte order, the stats). The key is a SHA-256 of everything the
blocks depend on (:func:`cache_key`): the sources (path, weight, and every file's size and mtime), the
tokenizer (its serialized vocabulary, merges, normalizer and special tokens, the ids of a probe text with every
special token, not the truncation and padding that transformers sets at each call), the chat template,
``loss_on``, ``seq_len``, ``packing``, ``long_documents``, the padding id, ``eval_fraction`` and :data:`FORMAT`.

Held out (``eval_fraction``): the last ``eval_fraction`` of each source's records (at least one record
where there are two or more), chosen by their place in the source before its weight is applied. They are
packed into blocks of their own, once each; every pass of the training side skips them, so no held-out
document is trained on, nor split between the two.

Building (:func:`build`): rows are read a chunk at a time (:mod:`lora_dist.sources`), parsed and
tokenized by ``num_proc`` worker processes (:class:`_Workers`; one chunk each at a time, at most
:data:`IN_FLIGHT` per worker sent or done and waiting their turn), and packed in
order by :class:`~lora_dist.packing.Packer` straight into the files of a staging dir, which is
published by one rename (:mod:`lora_dist.atomic`). The staging dir is marked as a live build's
(:class:`~lora_dist.atomic.WriterMark`): the next run that builds or opens the entry removes one whose
build was killed (:func:`sweep_killed_builds`). Neither the records nor the blocks are ever held whole
in memory. An entry is opened (:func:`open_entry`) only if its ``meta.json`` matches the key and every
file has exactly the size the shape says; anything else is rebuilt, never trusted.

On several ranks (:func:`cached_blocks`), rank 0 builds while the others wait, then every rank checks
that it sees the entry; where a node does not (a cache dir that is not shared), its first rank builds
its own copy. The others wait on the patient group (:class:`~lora_dist.ranks.RankGroup`), up to a day rather
than ``parallel.timeout_s``, polling, so a stop signal ends a waiting rank at once; a rank stopped while it
builds stops the ones waiting for it (:func:`lora_dist.preemption.stop_exits`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np

from lora_dist.atomic import WriterMark, publish_dir, sweep_abandoned
from lora_dist.chat import ChatError, bos_prefix, parse_record, resolve_template, tokenize_record
from lora_dist.inputs import clip
from lora_dist.packing import BLOCK_ARRAYS, DTYPE, Packer, blocks_fingerprint
from lora_dist.preemption import Preempted
from lora_dist.sources import (DataError, Source, check_source, copies, count_rows, read_chunks, record_place,
                               signature_json)

__all__ = ["FORMAT", "build", "cache_key", "cached_blocks", "default_cache_dir", "default_num_proc", "open_entry"]

log = logging.getLogger(__name__)

#: The cache format; part of every key, so a change of layout, of packing or of loss masks never reads old entries.
#: 2: chat turns of templates that write no end-of-turn token learn the token that ends them (GLM).
#: 3: text and prompt/completion documents start with BOS where the tokenizer adds one; null fields are absent in
#: JSON Lines too; a conversation opening with an assistant turn learns it from after its header.
#: 4: DeepSeek-R1 distills' turns are learned (after <｜Assistant｜>); a turn whose text its template drops is
#: refused.
#: 5: a conversation whose system or user message its template drops (Mistral v0.3's system message) is refused;
#: a template that renders text only from content parts (SmolVLM, Idefics3, LLaVA-NeXT) is handed parts.
#: 6: the held-out records (``eval_fraction``, in the key) are chosen before the weights and packed apart
#: (``eval_*.bin``); the tokenizer's fingerprint leaves out its truncation and padding.
#: 7: a prompt/completion document longer than ``seq_len`` whose prompt is one token (a tokenizer that starts texts
#: with no BOS: Qwen, GPT-2) is truncated as every document with a prompt, not split as text; a ``.txt`` file's
#: paragraphs end at lines of spaces or tabs too, without the line breaks around them; a message weight other than
#: 0 or 1, and a conversation with every assistant message at weight 0, are refused.
FORMAT = 7
#: Chunks per tokenization worker sent or done and waiting their turn (each worker tokenizes one at a time).
IN_FLIGHT = 2
#: Seconds the tokenization workers have to start; then the rank tokenizes by itself.
START_TIMEOUT_S = 60.0
#: A build's staging dir whose mark no process holds, made on another host, is removed once nothing in it or its
#: mark changed for this many seconds: where locks are node-local, a live build on another node touches its mark
#: every tenth of that.
ABANDONED_AFTER_S = 600.0


def default_cache_dir() -> Path:
    """``$LORA_DIST_CACHE``, else ``~/.cache/lora_dist/tokens``."""
    return Path(os.environ.get("LORA_DIST_CACHE") or Path.home() / ".cache" / "lora_dist" / "tokens")


def default_num_proc() -> int:
    """Tokenization workers when ``data.num_proc`` is 0: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


#: Text before and after the special tokens in :func:`tokenizer_fingerprint`'s probe: cases, accents, spaces,
#: digits, each token touching its neighbours (an added token's strip and single-word rules apply).
_PROBE_TEXT = ("Hello World ", "  ÀbÇ\tdé 0123 x")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's output: its serialized model, its special tokens, and the ids it gives
    a probe text holding every special token, with and without ``add_special_tokens``. The probe sees the settings
    that live outside the serialized model (``tokenizer_config.json``'s ``split_special_tokens``, a slow
    tokenizer's ``do_lower_case``...).

    The backend's ``truncation`` and ``padding`` are left out: transformers sets them at each call (it turns a
    saved ``truncation`` off at the first encode), so the fingerprint is the same before and after tokenizing.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = json.loads(backend.to_str())
        for runtime in ("truncation", "padding"):
            serialized.pop(runtime, None)
        h.update(json.dumps(serialized, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
    ids = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")]
    h.update(json.dumps([special, ids, str(getattr(tokenizer, "added_tokens_decoder", ""))], sort_keys=True).encode())
    added = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    probe = "".join([_PROBE_TEXT[0], *sorted(set(getattr(tokenizer, "all_special_tokens", [])) | added),
                     _PROBE_TEXT[1]])
    probed = [list(tokenizer(probe, add_special_tokens=flag)["input_ids"]) for flag in (True, False)]
    h.update(json.dumps(probed).encode())
    return h.hexdigest()


def cache_key(sources: list[Source], tokenizer, template: str | None, loss_on: str, seq_len: int, packing: bool,
              pad_id: int, eval_fraction: float = 0.0, long_documents: str = "auto") -> str:
    """The key of the blocks these inputs make (see the module docstring)."""
    parts = [FORMAT, signature_json(sources), tokenizer_fingerprint(tokenizer), template, loss_on, seq_len, packing,
             pad_id, float(eval_fraction), long_documents]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- tokenization workers

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, template: str | None, loss_on: str) -> None:
    _WORKER.update(tokenizer=tokenizer, template=template, loss_on=loss_on)


def _worker_main(conn, inherited: list, tokenizer, template: str | None, loss_on: str) -> None:
    """A :class:`_Workers` process: tokenizes each chunk ``conn`` brings and sends back ``("ok", result)`` or
    ``("error", exception)``, until ``None`` or end-of-file."""
    for c in inherited:
        c.close()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    # The signals a job step or Ctrl-C sends every process are the rank's to act on (it ends its workers);
    # SIGTERM ends a worker, whatever handlers the rank had when it forked it (lora_dist.preemption's only set
    # a flag).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in ("SIGINT", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    _init_worker(tokenizer, template, loss_on)
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the rank is gone
            return
        if task is None:
            return
        try:
            answer = ("ok", _tokenize_chunk(task))
        except Exception as e:
            answer = ("error", e)
        try:
            conn.send(answer)
        except (OSError, EOFError):
            return
        except Exception as e:  # a result or an exception that does not pickle
            what = f"{type(answer[1]).__name__}: {answer[1]}" if answer[0] == "error" else f"its result ({e})"
            conn.send(("error", DataError(f"tokenizing a chunk of {task[0]} failed: {clip(what)}")))


def _tokenize_chunk(task: tuple[str, str, list[tuple[int, Any]]]) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's records parsed and tokenized: ``(kinds, ids, labels, document lengths)``.

    Raises:
        DataError: a row that is not a record, or that the template or tokenizer refuses, naming its place.
    """
    path, kind, rows = task
    tok, template, loss_on = _WORKER["tokenizer"], _WORKER["template"], _WORKER["loss_on"]
    kinds: Counter = Counter()
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for pos, row in rows:
        if isinstance(row, str):
            try:
                row = json.loads(row)
            except json.JSONDecodeError as e:
                raise DataError(f"{record_place(path, kind, pos)}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{record_place(path, kind, pos)}: JSON nested too deeply to be a record") from None
        try:
            record = parse_record(row, pos)
            d_ids, d_labels = tokenize_record(record, tok, template, loss_on)
        except ChatError as e:
            raise DataError(f"{record_place(path, kind, pos)}: {e}") from None
        except MemoryError:
            raise
        except Exception as e:  # the tokenizer's own (the Rust tokenizer's TypeError on a lone surrogate)
            raise _tokenizer_error(record_place(path, kind, pos), row, e) from e
        kinds[record.kind] += 1
        ids += d_ids
        labels += d_labels
        lengths.append(len(d_ids))
    return (dict(kinds), np.asarray(ids, DTYPE), np.asarray(labels, DTYPE), np.asarray(lengths, np.int64))


def _surrogate(value: Any, name: str = "") -> tuple[str, int] | None:
    """Where the first lone UTF-16 surrogate in a record is: ``(field, character index)``, or None."""
    if isinstance(value, str):
        k = next((k for k, c in enumerate(value) if "\ud800" <= c <= "\udfff"), None)
        return None if k is None else (name, k)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        field = f"{name}[{key}]" if isinstance(key, int) else f"{name}.{key}" if name else str(key)
        found = _surrogate(item, field)
        if found is not None:
            return found
    return None


def _tokenizer_error(where: str, row: Any, error: Exception) -> DataError:
    """The one-line error for a record the tokenizer fails on, naming the field where it is a lone surrogate."""
    found = _surrogate(row)
    if found is not None:
        field, k = found
        return DataError(f"{where}: field {field} holds a lone UTF-16 surrogate at character {k} (a broken emoji or "
                         "escape, e.g. \\ud800 in JSON), which no tokenizer encodes; replace or drop the character "
                         "(e.g. text.encode('utf-8', 'replace').decode()) or drop the record")
    reason = clip(" ".join(f"{type(error).__name__}: {error}".split()), 160)
    return DataError(f"{where}: the tokenizer fails on this record ({reason}); fix or drop the record")


def held_out_from(sources: list[Source], eval_fraction: float) -> list[float]:
    """Where each source's held-out rows start (its last ``int(rows * eval_fraction)`` rows; where that is
    none at all, the last row of the largest source, if it has two or more): a row index counted from 0, or
    ``inf`` where none is held out."""
    if eval_fraction <= 0:
        return [math.inf] * len(sources)
    rows = [count_rows(s) for s in sources]
    held = [int(n * eval_fraction) for n in rows]
    largest = max(range(len(rows)), key=rows.__getitem__)
    if not any(held) and rows[largest] > 1:
        held[largest] = 1
    return [n - h if h else math.inf for n, h in zip(rows, held)]


def _tasks(sources: list[Source], eval_fraction: float = 0.0):
    """Every chunk to tokenize, in order, as ``(part, chunk)``: ``"eval"`` for the held-out rows
    (:func:`held_out_from`; in the first pass only, once each), ``"train"`` for the others: each source's
    passes (``ceil(weight)``), each pass's rows kept as :func:`~lora_dist.sources.copies` says (drawn by the
    row's line number or index)."""
    cuts = held_out_from(sources, eval_fraction)
    for si, source in enumerate(sources):
        kind = check_source(source)
        for p in range(math.ceil(source.weight)):
            seen = 0
            for chunk in read_chunks(source):
                first, seen = seen, seen + len(chunk)
                if seen > cuts[si]:  # the held-out rows are the source's last
                    k = max(0, int(cuts[si]) - first)
                    if p == 0:
                        yield "eval", (source.path, kind, chunk[k:])
                    chunk = chunk[:k]
                if p >= math.floor(source.weight):
                    chunk = [(pos, row) for pos, row in chunk if copies(source.weight, si, pos) > p]
                if chunk:
                    yield "train", (source.path, kind, chunk)


#: The file name prefix of the held-out blocks' arrays in an entry.
EVAL_PREFIX = "eval_"


class _Files:
    """The block arrays of an entry being built (``prefix``: the held-out ones), appended to as blocks arrive."""

    def __init__(self, root: Path, prefix: str = ""):
        self.handles = {name: (root / f"{prefix}{name}.bin").open("wb") for name in BLOCK_ARRAYS}

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():
            self.handles[name].write(np.ascontiguousarray(a, DTYPE).tobytes())

    def close(self) -> None:
        for f in self.handles.values():
            f.close()


def sweep_killed_builds(final: Path) -> None:
    """Remove the staging dirs of ``final`` that builds killed outright left (:func:`lora_dist.atomic.sweep_abandoned`:
    their mark is free, made on this host or idle for :data:`ABANDONED_AFTER_S`)."""
    try:
        removed = sweep_abandoned(final, idle_s=ABANDONED_AFTER_S)
    except OSError as e:  # a cache dir this user may read but not clean: a build would fail on its own
        log.debug("token cache: cannot sweep %s (%s)", final.parent, e)
        return
    for abandoned in removed:
        log.info("token cache: removed %s, left by a build that was killed", abandoned)


def build(final: Path, key: str, sources: list[Source], tokenizer, template: str | None, loss_on: str, seq_len: int,
          packing: bool, pad_id: int, num_proc: int, eval_fraction: float = 0.0, long_documents: str = "auto") -> dict:
    """Tokenize and pack ``sources`` into the entry ``final``, published atomically; returns its meta.

    Raises:
        DataError: a source or record that cannot be used, or no record at all to train on.
    """
    sweep_killed_builds(final)
    files: dict[str, _Files] = {}
    mark = None
    try:
        # the staging dir, marked as this live build's (a build on another node keeps its own)
        mark = WriterMark(final, heartbeat_s=ABANDONED_AFTER_S / 10)
        staging = mark.staging
        files["train"] = _Files(staging)
        if eval_fraction > 0:
            files["eval"] = _Files(staging, EVAL_PREFIX)
        bos = bos_prefix(tokenizer)
        packers = {part: Packer(seq_len, packing, pad_id, f.write, long_documents=long_documents,
                                bos_id=bos[0] if bos else None) for part, f in files.items()}
        kinds: dict[str, Counter] = {part: Counter() for part in files}
        for part, (chunk_kinds, ids, labels, lengths) in _tokenized(sources, tokenizer, template, loss_on, num_proc,
                                                                    eval_fraction):
            kinds[part].update(chunk_kinds)
            start = 0
            for n in lengths.tolist():
                packers[part].add(ids[start:start + n], labels[start:start + n])
                start += n
        for part, packer in packers.items():
            packer.finish()
            files[part].close()
        if not kinds["train"]:
            besides = f" besides the held-out ones; lower data.eval_fraction={eval_fraction:g}"
            raise DataError(f"data.path {', '.join(repr(s.path) for s in sources)} holds no records"
                            f"{besides if kinds.get('eval') else ''}")
        if not packers["train"].blocks:
            raise DataError(f"the data {', '.join(repr(s.path) for s in sources)}: nothing to train on: its "
                            f"{packers['train'].dropped} documents are all longer than train.seq_len={seq_len} and "
                            f"were left out (data.long_documents={long_documents}; a prompt that fills the block "
                            "leaves nothing to learn); raise train.seq_len, or set data.long_documents=split")
        held_out = bool(kinds.get("eval")) and packers["eval"].blocks > 0
        if kinds.get("eval") and not held_out:
            log.warning("the %d held-out records (data.eval_fraction=%g) are all longer than train.seq_len=%d and were "
                        "left out (data.long_documents=%s): no eval loss; raise train.seq_len or data.eval_fraction",
                        sum(kinds["eval"].values()), eval_fraction, seq_len, long_documents)
        if "eval" in files and not held_out:  # nothing held out (one record, or only documents left out)
            for name in BLOCK_ARRAYS:
                (staging / f"{EVAL_PREFIX}{name}.bin").unlink()

        def stats(part: str) -> dict:
            packer = packers[part]
            return {"records": dict(kinds[part]), "documents": packer.documents, "split": packer.split,
                    "truncated": packer.truncated, "dropped": packer.dropped, "blocks": packer.blocks,
                    "tokens": packer.tokens, "loss_tokens": packer.loss_tokens, "seq_len": seq_len, "packing": packing}

        packer = packers["train"]
        held_out = {"n_blocks": packers["eval"].blocks, "stats": stats("eval")} if held_out else None
        meta = {"format": FORMAT, "key": key, "byteorder": sys.byteorder, "seq_len": seq_len, "n_blocks": packer.blocks,
                "stats": stats("train"), "eval_fraction": eval_fraction, "eval": held_out,
                "sources": [[s.path, s.weight] for s in sources]}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            publish_dir(staging, final, replace=final.exists() and open_entry(final, key) is None)
        except FileExistsError:  # another process published the same key first: its entry is as good
            pass
        return meta
    finally:
        for f in files.values():
            f.close()
        if mark is not None:
            if mark.staging.exists():
                shutil.rmtree(mark.staging, ignore_errors=True)
            mark.release()


def _tokenized(sources: list[Source], tokenizer, template: str | None, loss_on: str, num_proc: int,
               eval_fraction: float = 0.0):
    """Each chunk's tokenized documents, in order, as ``(part, documents)`` (:func:`_tasks`); ``num_proc`` > 1
    tokenizes in worker processes (:class:`_Workers`) where there are two chunks or more."""
    tasks = _tasks(sources, eval_fraction)
    first = list(itertools.islice(tasks, 2))
    tasks = itertools.chain(first, tasks)
    if num_proc > 1 and len(first) > 1:
        try:
            workers = _Workers(num_proc, tokenizer, template, loss_on).start()
        except _NotStarted as e:
            log.warning("%s; tokenizing in this process instead (data.num_proc=1 skips the workers)", e)
        else:
            try:
                yield from workers.map(tasks)
            finally:
                workers.close()
            return
    _init_worker(tokenizer, template, loss_on)
    for part, task in tasks:
        yield part, _tokenize_chunk(task)


class _NotStarted(RuntimeError):
    """The tokenization workers did not all start in time."""


class _Workers:
    """``n`` forked tokenization processes, each with a pipe of its own, which tokenize one chunk at a time
    each.

    Nothing is shared between them: no lock or queue (``multiprocessing.Pool`` shares its queues' locks, and
    CI runs hung in its ``terminate()``). Workers that do not get ready in :data:`START_TIMEOUT_S` are an
    error (:class:`_NotStarted`), as is a worker that dies, naming its exit code, instead of a wait; a
    worker's error is raised in this process. :meth:`close` ends every worker (``SIGKILL`` unless all
    finished cleanly); a worker whose rank died sees its pipe end and exits.
    """

    def __init__(self, n: int, tokenizer, template: str | None, loss_on: str):
        self.n, self.args = n, (tokenizer, template, loss_on)
        self.conns: list = []
        self.procs: list = []
        self.finished = False

    def __enter__(self) -> _Workers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> _Workers:
        """Fork the workers and wait until each is ready.

        Raises:
            _NotStarted: one did not get ready within :data:`START_TIMEOUT_S` or exited (all are ended).
        """
        try:
            return self._start()
        except BaseException:  # a fork that failed, a worker that did not get ready, Ctrl-C: none is left behind
            self.close()
            raise

    def _start(self) -> _Workers:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        for _ in range(self.n):
            mine, theirs = context.Pipe()
            # A forked worker closes the ends of this process it inherited (its peers' and its own), so that
            # it sees end-of-file when this process dies.
            proc = context.Process(target=_worker_main, args=(theirs, [*self.conns, mine], *self.args),
                                   daemon=True, name="lora-dist-tokenize")
            self.conns.append(mine)
            try:
                proc.start()
            finally:
                theirs.close()
            self.procs.append(proc)
        # A process forked while another thread of this one held a lock (a library's) can wait for it forever:
        # that is a worker which never says it is ready, not a build that never ends.
        waiting = set(self.conns)
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            ready = multiprocessing.connection.wait(waiting, max(0.0, deadline - time.monotonic()))
            if not ready:
                raise _NotStarted(f"{len(waiting)} of {self.n} tokenization workers did not start within "
                                  f"{START_TIMEOUT_S:g} s")
            for conn in ready:
                try:
                    conn.recv()
                except (EOFError, OSError):
                    proc = self.procs[self.conns.index(conn)]
                    proc.join(timeout=5)
                    raise _NotStarted(f"a tokenization worker exited as it started (exit code {proc.exitcode})") \
                        from None
                waiting.discard(conn)
        return self

    def close(self) -> None:
        """End the workers: those that tokenized every chunk are told to exit, others (or any left after 5 s)
        are killed."""
        for conn, proc in zip(self.conns, self.procs):
            if self.finished:
                try:
                    conn.send(None)
                except OSError:
                    pass
                proc.join(timeout=5)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            proc.close()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []

    def _died(self, w: int, path: str) -> DataError:
        self.procs[w].join()
        return DataError(f"a tokenization worker died (exit code {self.procs[w].exitcode}) tokenizing a chunk of "
                         f"{path}; if memory ran out, lower data.num_proc")

    def map(self, tasks):
        """``(part, _tokenize_chunk(chunk))`` for each ``(part, chunk)`` of ``tasks``, in order; at most
        :data:`IN_FLIGHT` chunks per worker sent or waiting to be taken."""
        tasks = iter(tasks)
        free = deque(range(self.n))
        busy: dict[int, int] = {}  # worker: the index of the chunk it tokenizes
        parts: dict[int, str] = {}
        paths: dict[int, str] = {}
        done: dict[int, Any] = {}
        sent = taken = 0
        exhausted = False
        while True:
            while free and not exhausted and sent - taken < IN_FLIGHT * self.n:
                item = next(tasks, None)
                if item is None:
                    exhausted = True
                    break
                w = free.popleft()
                busy[w], parts[sent], paths[sent] = sent, item[0], item[1][0]
                try:
                    self.conns[w].send(item[1])
                except OSError:  # it died since its last chunk
                    raise self._died(w, paths[sent]) from None
                sent += 1
            if taken in done:
                paths.pop(taken)
                yield parts.pop(taken), done.pop(taken)
                taken += 1
                continue
            if not busy:
                break
            by_conn = {self.conns[w]: w for w in busy}
            by_sentinel = {self.procs[w].sentinel: w for w in busy}
            ready = multiprocessing.connection.wait([*by_conn, *by_sentinel])
            for w in sorted({by_conn.get(obj, by_sentinel.get(obj)) for obj in ready}):
                try:
                    status, value = self.conns[w].recv()
                except (EOFError, OSError):  # it died before it answered, or as it did
                    raise self._died(w, paths[busy[w]]) from None
                if status == "error":
                    raise value
                done[busy.pop(w)] = value
                free.append(w)
        self.finished = True


def open_entry(entry: Path, key: str) -> dict | None:
    """An entry's meta and block arrays (read-only memory maps), ``"held_out"`` the held-out blocks' (None where
    none are), or None where it is missing, partial or not this key's."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        n, S = int(meta["n_blocks"]), int(meta["seq_len"])
        if meta.get("format") != FORMAT or meta.get("key") != key or meta.get("byteorder") != sys.byteorder:
            return None
        arrays = _maps(entry, "", n, S)
        held_out = None if meta["eval"] is None else _maps(entry, EVAL_PREFIX, int(meta["eval"]["n_blocks"]), S)
        if arrays is None or (held_out is None and meta["eval"] is not None):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"meta": meta, "arrays": arrays, "held_out": held_out}


def _maps(entry: Path, prefix: str, n: int, S: int) -> dict[str, np.ndarray] | None:
    """The ``n`` blocks' arrays of an entry, memory-mapped, or None where a file has not the size they need."""
    if n < 1:
        return None
    arrays = {}
    for name, shape in BLOCK_ARRAYS.items():
        path = entry / f"{prefix}{name}.bin"
        dims = (n, S) if shape == "row" else (n,)
        if path.stat().st_size != int(np.prod(dims)) * np.dtype(DTYPE).itemsize:
            return None
        arrays[name] = np.memmap(path, dtype=DTYPE, mode="c", shape=dims)  # copy-on-write: never written back
    return arrays


def _check_same_blocks(group, opened: dict, seen: list, first: dict) -> None:
    """Ranks whose keys differ (each node reads its own copy of the data and the tokenizer: another mtime, or other
    files) must still hold the same blocks (:func:`~lora_dist.packing.blocks_fingerprint`, the training and the
    held-out ones), else they would train on different data without a word. The first rank of each (host, key)
    reads its entry; the others of its node map the same files."""
    digest = error = None
    if first[seen[group.rank][:2]] == group.rank:
        try:
            digest = [blocks_fingerprint(opened["arrays"]),
                      opened["held_out"] is not None and blocks_fingerprint(opened["held_out"])]
        except OSError as e:  # a mapped file cut short meanwhile: every rank stops, none waits
            error = DataError(f"cannot read the token cache entry of rank {group.rank} ({e})")
    group.check(error)
    digests = group.all_gather(digest)
    other = [rank for rank, d in enumerate(digests) if d is not None and d != digests[0]]
    if other:
        host, key, _ = seen[other[0]]
        raise DataError(f"rank {other[0]} (host {host}) tokenized other blocks than rank 0 (host {seen[0][0]}): its "
                        f"data files or tokenizer differ (token cache key {key[:12]} against {seen[0][1][:12]}); "
                        "give every node the same data files and the same model dir")


def cached_blocks(sources: list[Source], tokenizer, chat_template: str, loss_on: str, seq_len: int, packing: bool,
                  pad_id: int, cache_dir: str | Path | None = None, num_proc: int = 0,
                  verbose: bool = True, eval_fraction: float = 0.0, long_documents: str = "auto") -> dict:
    """The packed blocks of ``sources`` from the cache, built there first where missing (collective when a
    process group is initialized: call on every rank), the last ``eval_fraction`` of each source's records
    held out (see the module docstring).

    Returns:
        ``{"meta", "arrays", "held_out", "entry", "built"}``: the entry's meta (stats included), its
        memory-mapped training arrays and held-out arrays (None where none are held out), its dir and whether
        this process built it.

    Raises:
        DataError: as :func:`build`, on every rank.
    """
    from lora_dist.ranks import RankGroup

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    # A source one node cannot read stops every rank now, before the others settle into a long wait.
    error = key = template = None
    try:
        try:
            template = resolve_template(tokenizer, chat_template)
        except ChatError as e:
            raise DataError(str(e)) from None
        for s in sources:
            check_source(s)
        key = cache_key(sources, tokenizer, template, loss_on, seq_len, packing, pad_id, eval_fraction, long_documents)
    except (Exception, Preempted) as e:
        error = e
    RankGroup().check(error)
    entry = root / key
    workers = num_proc or default_num_proc()
    built = []

    def ensure() -> None:
        if open_entry(entry, key) is not None:
            sweep_killed_builds(entry)  # a rerun that finds the entry built (by a build after the killed one)
        else:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(f"cannot create the token cache {root} ({e.strerror}); set data.cache_dir "
                                "(or $LORA_DIST_CACHE) to a writable dir") from None
            build(entry, key, sources, tokenizer, template, loss_on, seq_len, packing, pad_id, workers, eval_fraction,
                  long_documents)
            built.append(True)

    # The other ranks wait for the build however long it takes, not parallel.timeout_s.
    group = RankGroup(patient=True)
    group.on_rank0(ensure)
    # Per rank: its host, its key (another node's copies of the files may key apart), whether it sees the entry.
    seen = group.all_gather((socket.gethostname(), key, open_entry(entry, key) is not None))
    first = {}
    for rank, (host, k, _) in enumerate(seen):
        first.setdefault((host, k), rank)
    missing = {(host, k) for host, k, ok in seen if not ok}
    if missing:  # a cache dir that is not shared, or a node keying apart: one build per node and key
        error = None
        mine = (socket.gethostname(), key)
        if mine in missing and first[mine] == group.rank:
            try:
                ensure()
            except (Exception, Preempted) as e:  # a stop signal here stops the ranks waiting for this build too
                error = e
        group.check(error)  # the others wait polling: a stop signal ends a waiting rank
    opened = open_entry(entry, key)
    error = None if opened is not None else DataError(
        f"the token cache entry {entry} is missing or incomplete after it was built; check that {root} is writable "
        "and not cleaned meanwhile (data.cache_dir)")
    if len({k for _, k, _ in seen}) > 1:  # every rank comes here: the check below is collective
        group.check(error)
        _check_same_blocks(group, opened, seen, first)
    elif error is not None:
        raise error
    if verbose:
        log.info("token cache: %s %s", "built" if built else "reused", entry)
    return {**opened, "entry": entry, "built": bool(built)}
