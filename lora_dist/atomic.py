"""Durable, atomic writes of files and directories: the one way lora_dist publishes its outputs.

A directory (an adapter, a training checkpoint, a merged export) is written into
a staging dir next to its final place, every file and the dir are fsynced, and
the staging dir is renamed into place. Where a previous version exists it is
swapped out in one atomic ``renameat2(RENAME_EXCHANGE)`` and removed only once
the new one is in place, so a crash at any moment leaves either the old or the
new version under the final name, never neither. Filesystems without the
exchange (some network filesystems) get two renames, and the next writer or
reader of that path puts a version left aside back (:func:`recover`): a writer killed
between the two renames leaves the previous version under ``.NAME.old-*``, never
nothing. A reader that does so while a live writer is between its renames makes the
writer set the restored version aside again, not fail.

Everything published gets the umask's permissions, like any file the user
creates: staging dirs are made with ``mkdir`` (not ``mkdtemp``'s 0700), and the
files in them, which some writers create 0600 (safetensors does), are set to
``0666 & ~umask`` before the publish, so teammates can read what a shared run wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["WRITER_MARK", "WriterMark", "fsync", "publish_dir", "recover", "rename_exchange", "staging_dir",
           "sweep_abandoned", "umask", "write_safetensors", "write_text_atomic", "writing_dir", "writing_file"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries (renames into it), to disk.

    A no-op for directories on filesystems that refuse to fsync them.
    """
    path = Path(path)
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (contiguous, on the CPU) as a safetensors file, and fail if any part of the write fails.

    safetensors' ``save_file`` drops the error of the file's close, which is where a network filesystem (NFS)
    reports a write it could not complete; the file would then be published short. Here the bytes are written,
    fsynced and closed by Python, which raises on each. For the small files (adapters, LoRA checkpoints) the
    serialized bytes are held in memory once.
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_permissions(root: Path) -> None:
    """Files under ``root`` get ``0666 & ~umask``, dirs ``0777 & ~umask`` (links are left alone)."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def writing_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Yield a file open on a sibling of ``path``; on a clean exit it is fsynced, closed and renamed to ``path``
    (replacing it), on an error removed. A crash leaves the old file or the new one, durably, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new file, durably."""
    with writing_file(path) as f:
        f.write(text)


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _aside_prefix(final: Path) -> str:
    return f".{final.name}.old-"


def staging_dir(final: str | os.PathLike) -> Path:
    """A new, empty dir next to ``final`` (same filesystem, so the publish is a rename), umask permissions."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = final.with_name(_staging_prefix(final) + secrets.token_hex(4))
        try:
            staging.mkdir()
            return staging
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike, *, replace: bool = False) -> Path:
    """Give ``staging`` and its files the umask's permissions, fsync them, then rename it to ``final``.

    Args:
        staging: a dir made by :func:`staging_dir` for ``final``.
        final: where the result is published.
        replace: replace an existing ``final``; it stays in place until the new version is.

    Raises:
        FileExistsError: ``final`` exists and ``replace`` is False (``staging`` is left for the caller).
    """
    staging, final = Path(staging), Path(final)
    _umask_permissions(staging)
    for f in staging.rglob("*"):
        if f.is_file():
            fsync(f)
    fsync(staging)
    if os.path.lexists(final):
        if not replace:
            raise FileExistsError(errno.EEXIST, f"{final} already exists", str(final))
        if rename_exchange(staging, final):
            fsync(final.parent)
            _remove(staging)  # the previous version, now under the staging name
            return final
        _replace_in_two_renames(staging, final)
        return final
    os.replace(staging, final)
    fsync(final.parent)
    return final


_ASIDE_TRIES = 5


def _replace_in_two_renames(staging: Path, final: Path) -> None:
    """Set ``final`` aside, rename ``staging`` to it, remove what was set aside (no ``RENAME_EXCHANGE``).

    A reader's :func:`recover` may put the version set aside back in the window between the two
    renames (it sees ``final`` missing); the second rename then fails on the restored dir, which is
    set aside again and the rename retried. On any other failure the previous version is put back.
    """
    asides: list[Path] = []
    for attempt in range(_ASIDE_TRIES):
        aside = final.with_name(_aside_prefix(final) + secrets.token_hex(4))
        os.replace(final, aside)
        asides.append(aside)
        try:
            os.replace(staging, final)
            break
        except BaseException:
            if os.path.lexists(final) and os.path.lexists(staging) and attempt + 1 < _ASIDE_TRIES:
                continue  # a reader put the previous version back: set it aside again
            if not os.path.lexists(final):
                for previous in reversed(asides):
                    with contextlib.suppress(FileNotFoundError):  # a reader may have put it back already
                        os.replace(previous, final)
                        break
            raise
    fsync(final.parent)
    for aside in asides:
        _remove(aside)


def recover(final: str | os.PathLike, *, cleanup: bool = True) -> bool:
    """Undo what a writer killed mid-publish left next to ``final``.

    Where ``final`` is missing and a version set aside by :func:`publish_dir` (two
    renames, no exchange) is there, the newest one is put back. With ``cleanup``,
    staging dirs and the other versions set aside are removed too: only the one
    writer of ``final`` may do that (a reader would delete a live writer's staging
    dir); readers pass ``cleanup=False``.

    Args:
        final: the published path (a dir or a file).
        cleanup: also remove leftovers (writers only).

    Returns:
        Whether a version set aside was put back.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return False
    aside = sorted((p for p in parent.glob(_aside_prefix(final) + "*")), key=lambda p: p.stat().st_mtime)
    restored = False
    if not os.path.lexists(final) and aside:
        try:
            os.replace(aside.pop(), final)
            restored = True
        except FileNotFoundError:  # another reader put it back first
            pass
        fsync(parent)
    if cleanup:
        for leftover in [*aside, *parent.glob(_staging_prefix(final) + "*")]:
            _remove(leftover)
    return restored


WRITER_MARK = ".lora_dist-writer"


class WriterMark:
    """A live writer's mark on its staging dir: a file it holds an ``flock`` on, which dies with the process.

    Used where nothing else keeps two writers of one path apart (``lora-dist merge --out O`` takes no lock), so
    that the next writer can tell a staging dir whose writer was killed (:func:`sweep_abandoned` removes it) from
    a live one. The file is created under another name and renamed into place once locked, so a mark that can be
    seen is always held. Where the filesystem has no ``flock`` (Lustre mounted ``noflock``) the dir stays
    unmarked, and unmarked dirs are never removed.

    Args:
        staging: the staging dir this process writes.
    """

    def __init__(self, staging: str | os.PathLike) -> None:
        import fcntl

        self.path = Path(staging) / WRITER_MARK
        self._fd: int | None = None
        tmp = self.path.with_name(f"{WRITER_MARK}.tmp-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self.path)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            return
        self._fd = fd

    def unmark(self) -> None:
        """Take the mark out of the dir (before publishing it); the lock is still held until :meth:`release`."""
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the mark and drop the lock (after the publish, or after removing the staging dir)."""
        self.unmark()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sweep_abandoned(final: str | os.PathLike) -> list[Path]:
    """Remove the staging dirs of ``final`` whose writer died: those with a :class:`WriterMark` no process holds.

    A dir without a mark (a writer on a filesystem without ``flock``, one about to publish, or one of another
    kind) is left alone, as is one whose mark is held by a live writer, on any node that shares the filesystem.

    Returns:
        The staging dirs removed.
    """
    import fcntl

    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for staging in final.parent.glob(_staging_prefix(final) + "*"):
        try:
            fd = os.open(staging / WRITER_MARK, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(staging, ignore_errors=True)  # its writer is gone: the lock was free
        finally:
            os.close(fd)
        removed.append(staging)
    return removed


@contextlib.contextmanager
def writing_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Fill the yielded staging dir; on a clean exit it is published as ``final``, on an error removed."""
    final = Path(final)
    recover(final)
    staging = staging_dir(final)
    try:
        yield staging
        publish_dir(staging, final, replace=replace)
    finally:
        if staging.exists():
            _remove(staging)
