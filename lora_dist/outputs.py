"""What lora_dist may write where: the one place every command's outputs are checked.

The contract (``docs/safety.md``): lora_dist creates, replaces or deletes only what it
wrote itself.

* A **run dir** (``output.dir``) is recognised by the marker file :data:`RUN_MARKER`
  lora_dist writes when it creates the run. A non-empty dir without it is refused
  before any work. Run dirs written before the marker existed are recognised by
  their layout (a run ``config.json`` next to ``checkpoints/``, ``adapter/`` or
  ``metrics.jsonl``) and get the marker. The marker's ``run_id`` names the run:
  every checkpoint records it (:mod:`lora_dist.checkpoint`), so one run never
  resumes, prunes or replaces another's.
* **One run at a time** per run dir: the training process of rank 0 holds an
  exclusive lock (:class:`RunLock`, ``flock`` on :data:`RUN_LOCK`) from before
  its first write until it ends; a second run into the same dir is refused in one
  line. The kernel drops the lock when the process dies, so a killed run never
  blocks the next. Where the filesystem has no ``flock``, runs go unlocked, with a warning.
* A **merged export** is recognised by the metadata key lora_dist writes into its
  safetensors headers; ``--overwrite`` replaces only such a dir (or an adapter dir
  lora_dist wrote, for ``save_adapter``).
* An output is never an input: never the base model dir, an adapter dir or a data
  file, never a dir that contains one of them or lies inside one, ``--overwrite``
  or not.
* An output path starting with ``~`` is refused: nothing expanded it (the config expands
  its path keys, :func:`lora_dist.config.home`; the shell leaves a ``~`` after ``=``
  alone), and writing it would create a dir named ``~`` in the working dir.
* An output that cannot be written (permissions, a read-only filesystem, a full
  disk) is :class:`OutputDirError`: one line naming the path, the reason and the fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Iterable

from lora_dist.errors import UserError

__all__ = [
    "RUN_LOCK",
    "RUN_MARKER",
    "OutputDirError",
    "OutputError",
    "RunLock",
    "check_not_an_input",
    "check_replaceable",
    "ADAPTER_FILES",
    "CHAT_TEMPLATE_FILE",
    "is_adapter_dir",
    "is_model_dir",
    "prepare_run_dir",
    "read_run_marker",
    "write_failure",
]

#: Written into every run dir lora_dist creates: ``{"run_id": ..., "created": ...}``.
RUN_MARKER = ".lora_dist_run.json"
#: The lock file of a run dir (:class:`RunLock`); it holds the pid and host of the run holding the lock.
RUN_LOCK = ".lora_dist_run.lock"
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: The file of a tokenizer's chat template, which transformers reads before ``tokenizer_config.json``'s: a merged
#: export writes there the template training used (``data.chat_template``), an adapter dir carries it.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: The files of a PEFT-format adapter dir (``.bin``: an older PEFT's weights).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_RUN_CONTENTS = ("checkpoints", "adapter", "metrics.jsonl", "merged")


class OutputError(UserError, ValueError):
    """An output path that would overwrite or mix with something lora_dist did not write."""


class OutputDirError(UserError, OSError):
    """An output that cannot be written: no permission, a read-only filesystem, a full disk."""


def write_failure(error: BaseException, what: str, fix: str) -> OutputDirError:
    """One-line :class:`OutputDirError` for a failed write (``OSError``, or safetensors' I/O error).

    Args:
        error: what the write raised.
        what: what was being written, e.g. ``checkpoint step-000004 in /runs/a/checkpoints``.
        fix: what the user can do, and what is still intact.
    """
    reason = getattr(error, "strerror", None) or " ".join(str(error).split()) or type(error).__name__
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or "No space left" in reason:
        reason, fix = "no space left on device", f"free space or choose another output.dir; {fix}"
    return OutputDirError(f"cannot write {what} ({reason}); {fix}")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def is_model_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model dir: ``config.json`` next to weights."""
    p = Path(path)
    return (p / "config.json").is_file() and any((p / f).exists() for f in _MODEL_FILES)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A PEFT-format adapter dir."""
    return any((Path(path) / f).exists() for f in ADAPTER_FILES)


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str) -> None:
    """Refuse an output that is an input, contains one, or lies inside one (symlinks resolved), or that starts
    with an unexpanded ``~``.

    Args:
        out: the output path.
        inputs: the command's input paths (None entries are skipped).
        what: how the output is named to the user (``output.dir``, ``--out``).

    Raises:
        OutputError: naming the input and the fix.
    """
    if os.fspath(out).startswith("~"):
        raise OutputError(f"{what} {str(out)!r} starts with ~, which nothing expanded (the shell does not after =): "
                          f"it would create a dir named {Path(out).parts[0]} in the working dir; write the home "
                          "dir's path out (or ./ before it for a dir of that name)")
    target = _real(out)
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = _real(item)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise OutputError(f"{what} {str(out)!r} {relation} the input {str(item)!r}; writing there could replace or "
                          f"delete it: choose a {what} outside every input")


def check_replaceable(directory: Path, files: Iterable[str], what: str, error: type[Exception]) -> None:
    """Refuse (``error``) a ``directory`` that is a file or holds anything but ``files``, the files of ``what``
    (``"the adapter"``): publishing ``what`` replaces the whole dir, and all it holds with it (a user's folder, the
    base model dir passed by mistake)."""
    if not directory.is_dir():
        if directory.exists():
            raise error(f"{directory} is a file; choose a new or empty dir for {what}")
        return
    others = sorted(p.name for p in directory.iterdir() if p.name not in files)
    if others:
        raise error(f"refusing to write {what} to {directory}: it holds {others[0]}"
                    + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                    + f", and writing replaces the whole dir (only one holding {what}'s files alone is replaced); "
                    f"choose a new or empty dir for {what}")


def read_run_marker(run_dir: str | os.PathLike) -> dict | None:
    """The run dir's marker, or None where there is none (or it is unreadable)."""
    try:
        marker = json.loads((Path(run_dir) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("run_id"), str) else None


def _is_legacy_run_dir(path: Path) -> bool:
    """A run dir an earlier lora_dist wrote (before the marker): a run config.json and run contents."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    is_run_config = isinstance(config, dict) and {"model", "lora", "train", "output"} <= set(config)
    return is_run_config and any((path / name).exists() for name in _RUN_CONTENTS)


def _is_transient(name: str) -> bool:
    """What a concurrent first run into the same dir writes while it makes the dir a run dir (the marker
    too: it may appear between reading it and listing the dir)."""
    return name in (RUN_LOCK, RUN_MARKER) or name.startswith((f".{RUN_MARKER}.tmp-", ".write-test-"))


def _entries(path: Path) -> list[str]:
    """The dir's entries, but what a concurrent first run may be writing there right now."""
    return sorted(p.name for p in path.iterdir() if not _is_transient(p.name))


def _create_marker(path: Path) -> dict:
    """Write a new marker unless another process just did (then that one is the run's)."""
    from lora_dist.atomic import fsync

    marker = {"run_id": secrets.token_hex(8), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    final = path / RUN_MARKER
    tmp = path / f".{RUN_MARKER}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.write_text(json.dumps(marker) + "\n")
        fsync(tmp)
        try:
            os.link(tmp, final)  # exclusive: two first runs racing into one new dir agree on one run id
        except FileExistsError:
            existing = read_run_marker(path)
            if existing is not None:
                return existing
            os.replace(tmp, final)  # an unreadable marker: ours replaces it
        except OSError:  # no hard links on this filesystem
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path)
    return marker


def prepare_run_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> dict:
    """Make ``out`` a run dir (rank 0, before anything is written into it); returns its marker.

    An absent or empty dir becomes a new run dir; a run dir (marker, or an earlier
    lora_dist's layout) is reused. Anything else is refused, before any work. Nothing
    is created when it is refused.

    Args:
        out: ``output.dir``.
        inputs: the run's inputs (``model.path``, ``data.path``); None entries are skipped.

    Returns:
        The marker: ``{"run_id": ..., "created": ...}``.

    Raises:
        OutputError: ``out`` is or touches an input, or holds files lora_dist did not write.
        OutputDirError: ``out`` cannot be created or written.
    """
    check_not_an_input(out, inputs, "output.dir")
    path = Path(out)
    fix = "choose another output.dir"
    if path.is_symlink() and not path.exists():
        raise OutputError(f"output.dir {str(out)!r} is a dangling symlink; point it at a dir or {fix}")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output.dir {str(out)!r} is a file; choose a directory for the run")
    try:
        marker = read_run_marker(path)
        if marker is None and path.is_dir() and _entries(path) and not _is_legacy_run_dir(path):
            if is_model_dir(path) or is_adapter_dir(path):
                kind = "a model dir" if is_model_dir(path) else "an adapter dir"
                raise OutputError(f"output.dir {str(out)!r} is {kind}, not a run dir; choose a new or empty "
                                  "output.dir")
            shown = ", ".join(_entries(path)[:3])
            raise OutputError(f"output.dir {str(out)!r} holds files lora_dist did not write ({shown}, ...); choose a "
                              "new or empty output.dir")
        path.mkdir(parents=True, exist_ok=True)
        if marker is None:
            marker = _create_marker(path)
        probe = path / f".write-test-{os.getpid()}-{secrets.token_hex(2)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output.dir {str(out)!r} is not writable ({e.strerror or e}); {fix}") from None
    return marker


class RunLock:
    """The exclusive lock of a run dir: one run at a time writes into it.

    ``flock`` on :data:`RUN_LOCK` (the kernel releases it when the holder dies);
    the file records the holder's pid and host for the refusal message. Where the
    filesystem has no ``flock`` the lock is a no-op.

    Args:
        run_dir: the run dir (it exists: :func:`prepare_run_dir` made it).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / RUN_LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            OutputError: another run holds it, naming its pid and host.
            OutputDirError: the lock file cannot be created.
        """
        import fcntl

        try:
            # held from here (release closes it): a stop signal raised out of what follows leaves no lock behind
            self._fd = fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputDirError(f"output.dir {str(self.path.parent)!r} is not writable ({e.strerror or e}); "
                                 "choose another output.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            self.release()
            raise OutputError(f"output.dir {str(self.path.parent)!r} is in use by another lora-dist run ({holder}); "
                              "wait for it to finish or choose another output.dir") from None
        except OSError as e:  # no flock on this filesystem (Lustre mounted noflock...): run unlocked, and say so
            self.release()
            logging.getLogger(__name__).warning(
                "output.dir %r cannot be locked on this filesystem (%s): a second run into it at the same time would "
                "not be refused, and the two would prune each other's checkpoints; give each run its own output.dir",
                str(self.path.parent), e.strerror or e)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means no run holds the dir)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
