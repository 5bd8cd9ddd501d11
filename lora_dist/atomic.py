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
import re
import secrets
import shutil
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator

__all__ = ["WriterMark", "discard", "fsync", "publish_dir", "recover", "rename_exchange", "staging_dir",
           "sweep_abandoned", "umask", "write_text_atomic", "writing_dir", "writing_file"]

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


def _discard_prefix(final: Path) -> str:
    return f".{final.name}.del-"


_TOKEN = re.compile(r"[0-9a-f]{8}")


def _tokened(final: Path, prefix: str) -> list[Path]:
    """The siblings of ``final`` named ``prefix`` + a token (no glob: ``final``'s name may hold ``[*?``, and
    ``.a.tmp-`` must not take ``.a.tmp-b.tmp-XXXX``, a staging dir of ``a.tmp-b``)."""
    try:
        names = os.listdir(final.parent)
    except OSError:  # no parent, or one that cannot be listed (x without r): nothing to find, as glob finds
        return []
    return [final.with_name(n) for n in names if n.startswith(prefix) and _TOKEN.fullmatch(n[len(prefix):])]


def discard(path: str | os.PathLike, final: str | os.PathLike | None = None) -> None:
    """Remove ``path`` (``final``, or a version of it no longer wanted) renamed first to ``.FINAL.del-XXXX``, a name
    :func:`recover` never restores and the next writer removes: a removal cut short (a kill, a file a network
    filesystem keeps busy) leaves no half-deleted dir under a name that counts.

    Raises:
        OSError: the rename failed (``path`` is then as it was); a missing ``path`` is no error.
    """
    path = Path(path)
    final = path if final is None else Path(final)
    dead = final.with_name(_discard_prefix(final) + secrets.token_hex(4))
    try:
        os.replace(path, dead)
    except FileNotFoundError:
        return
    _remove(dead)


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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _replace_in_two_renames(staging: Path, final: Path) -> None:
    """Set ``final`` aside, rename ``staging`` to it, remove what was set aside (no ``RENAME_EXCHANGE``).

    A reader's :func:`recover` may put the version set aside back in the window between the two
    renames (it sees ``final`` missing); the second rename then fails on the restored dir, which is
    set aside again and the rename retried. Anything else found there (another writer's output) is
    left alone and the publish fails. On any other failure the previous version is put back.
    """
    asides: list[Path] = []
    for attempt in range(_ASIDE_TRIES):
        aside = final.with_name(_aside_prefix(final) + secrets.token_hex(4))
        previous = _identity(final)
        os.replace(final, aside)
        asides.append(aside)
        try:
            os.replace(staging, final)
            break
        except BaseException as e:
            if isinstance(e, OSError) and attempt + 1 < _ASIDE_TRIES and os.path.lexists(staging) \
                    and _identity(final) == previous:
                continue  # a reader put the version set aside back (never another writer's output): again
            if not os.path.lexists(final):
                for version in reversed(asides):
                    with contextlib.suppress(FileNotFoundError):  # a reader may have put it back already
                        os.replace(version, final)
                        break
            else:  # another writer's output took the place: what this one set aside was being replaced anyway
                for version in asides:
                    discard(version, final)
            raise
    fsync(final.parent)
    for aside in asides:
        discard(aside, final)


def _mtime(path: Path) -> float:
    """When ``path`` last changed; -inf where it is gone (another reader moved it back meanwhile)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("-inf")


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
    aside = sorted(_tokened(final, _aside_prefix(final)), key=_mtime)
    restored = False
    if not os.path.lexists(final) and aside:
        try:
            os.replace(aside.pop(), final)
            restored = True
        except FileNotFoundError:  # another reader put it back first
            pass
        fsync(parent)
    if cleanup:
        for leftover in [*aside, *_tokened(final, _staging_prefix(final)), *_tokened(final, _discard_prefix(final))]:
            _remove(leftover)
    return restored


def _mark_prefix(final: Path) -> str:
    return f".{final.name}.writer-"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


_held_marks: weakref.WeakSet = weakref.WeakSet()  # marks this process holds (the lock leaves with the process)


def _drop_marks_in_child() -> None:
    """A forked child (a tokenization worker) closes its copy of every held mark's fd: the parent's lock stays,
    but no longer outlives the parent while the child lives."""
    for mark in list(_held_marks):
        if mark._fd is not None:
            os.close(mark._fd)
            mark._fd = None
        mark._beating = None


os.register_at_fork(after_in_child=_drop_marks_in_child)


class WriterMark:
    """A new staging dir for ``final``, marked as a live writer's by a file it holds an ``flock`` on.

    Used where nothing else keeps two writers of one path apart (``lora-dist merge --out O`` takes no lock),
    so the next writer can tell a staging dir whose writer was killed (:func:`sweep_abandoned` removes it)
    from a live one. The mark ``.O.writer-XXXX`` lies next to the staging dir ``.O.tmp-XXXX``, never in it,
    and is locked before that dir exists and released only after it is published or removed (the kernel
    releases it when the process dies). Where the filesystem has no ``flock`` (Lustre mounted ``noflock``)
    the dir is unmarked, and unmarked dirs are never removed. The mark names its host, and ``heartbeat_s``
    touches it that often until it is released: where locks are node-local, a sweep on another node tells a
    live writer by that (:func:`sweep_abandoned`'s ``idle_s``).

    Args:
        final: the path the staging dir will be published as.
        heartbeat_s: seconds between touches of the mark (None: never).

    Attributes:
        staging: the new, empty staging dir.
    """

    def __init__(self, final: str | os.PathLike, heartbeat_s: float | None = None) -> None:
        self._beating: threading.Event | None = None
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            token = secrets.token_hex(4)
            self.path = final.with_name(_mark_prefix(final) + token)
            self.staging = final.with_name(_staging_prefix(final) + token)
            if os.path.lexists(self.staging):  # pragma: no cover - 32 random bits collided
                continue
            self._fd = self._lock()
            if self._fd is False:  # a sweep took the new mark for a dead writer's and removed it: start over
                continue
            try:
                if self._fd is not None:
                    os.write(self._fd, f"{_host_id()}\n".encode())
                self.staging.mkdir()
            except BaseException:
                self.release()
                raise
            if self._fd is not None:
                _held_marks.add(self)
            if heartbeat_s and self._fd is not None:
                self._beating = threading.Event()
                threading.Thread(target=self._beat, args=(self._beating, heartbeat_s), daemon=True,
                                 name="lora_dist-writer-mark").start()
            return

    def _beat(self, stop: threading.Event, every_s: float) -> None:
        while not stop.wait(every_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _lock(self) -> int | None | bool:
        """The held mark's fd; None where the filesystem has no flock (no mark); False if it was swept away."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper holds it only while it looks at a dir that is not there yet
        except BaseException as e:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            if isinstance(e, OSError):
                return None
            raise
        try:
            same = _same_file(fd, self.path)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        if not same:
            os.close(fd)
            return False
        return fd

    def release(self) -> None:
        """Drop the lock (after the staging dir is published or removed), and the mark's file where the dir is
        gone: a dir that is still there (its removal failed) stays marked, for the next sweep."""
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if not os.path.lexists(self.staging):
                self.path.unlink(missing_ok=True)


def _host_id() -> str:
    """This host and its boot: a mark made here whose lock is free is a dead writer's, whatever the filesystem."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()} {boot}"


def _last_change(root: Path) -> float:
    """The latest mtime of ``root`` and, for a dir, of everything in it (0 where it is gone)."""
    paths = [str(root)]
    for dirpath, dirs, names in os.walk(root):
        paths += [os.path.join(dirpath, n) for n in (*dirs, *names)]
    latest = 0.0
    for path in paths:
        try:
            latest = max(latest, os.lstat(path).st_mtime)
        except OSError:
            pass
    return latest


def sweep_abandoned(final: str | os.PathLike, idle_s: float = 0.0) -> list[Path]:
    """Remove the staging dirs of ``final`` whose writer died: those whose :class:`WriterMark` no process holds
    (and, with ``idle_s``, where the mark was made on another host, in which, mark included, nothing changed for
    that many seconds).

    A dir without a mark (a writer on a filesystem without ``flock``, or of another kind) is left alone, as is
    one whose mark a live writer holds, on any node where ``flock`` reaches across nodes (NFSv4, Lustre
    ``flock``); where locks are node-local (NFS ``nolock``, Lustre ``localflock``) a writer on another node
    is not seen, unless ``idle_s`` is given: a live writer keeps its mark fresh (``WriterMark``'s
    ``heartbeat_s``, well under ``idle_s``).

    Returns:
        The staging dirs removed.
    """
    import fcntl

    final = Path(final)
    removed = []
    for dead in _tokened(final, _discard_prefix(final)):  # versions a writer was removing when it died
        _remove(dead)
    for mark in _tokened(final, _mark_prefix(final)):
        try:
            fd = os.open(mark, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer's
            if not _same_file(fd, mark):
                continue
            staging = final.with_name(_staging_prefix(final) + mark.name[len(_mark_prefix(final)):])
            if idle_s and os.pread(fd, 512, 0).decode(errors="replace").strip() != _host_id():
                if time.time() - max(_last_change(staging), _last_change(mark)) < idle_s:
                    continue
            if os.path.lexists(staging):
                _remove(staging)
                if os.path.lexists(staging):
                    continue  # keep the mark: the next sweep tries again
                removed.append(staging)
            mark.unlink(missing_ok=True)
        finally:
            os.close(fd)
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
