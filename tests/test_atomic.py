"""The one atomic publish (lora_dist.atomic): never neither version, umask permissions, repair after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distutil import REPO, quiet_env
from lora_dist import atomic
from lora_dist.atomic import (
    WriterMark,
    publish_dir,
    recover,
    staging_dir,
    sweep_abandoned,
    write_text_atomic,
    writing_dir,
)


def _write_version(final: Path, text: str, **kwargs) -> None:
    with writing_dir(final, replace=True, **kwargs) as staging:
        (staging / "weights.bin").write_text(text)
        (staging / "sub").mkdir()
        (staging / "sub" / "more.txt").write_text(text)


def _siblings(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p.name != final.name)


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for the test; the previous one comes back after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def test_publish_new_and_replace_leave_no_leftovers(tmp_path):
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    _write_version(final, "v2")
    assert (final / "weights.bin").read_text() == "v2" and (final / "sub" / "more.txt").read_text() == "v2"
    assert _siblings(final) == []


def test_publish_without_replace_refuses_an_existing_dir(tmp_path):
    final = tmp_path / "merged"
    _write_version(final, "v1")
    with pytest.raises(FileExistsError):
        with writing_dir(final) as staging:
            (staging / "weights.bin").write_text("v2")
    assert (final / "weights.bin").read_text() == "v1" and _siblings(final) == []


def test_with_rename_exchange_there_is_no_window_without_the_final_dir(tmp_path, monkeypatch):
    """The replace is one renameat2(RENAME_EXCHANGE): ``final`` is never renamed away, so no crash can lose it."""
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    if not atomic.rename_exchange(a, b):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    a.rmdir()
    b.rmdir()
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    moves: list[tuple[str, str]] = []
    real = os.replace

    def spy(src, dst):
        moves.append((Path(src).name, Path(dst).name))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    _write_version(final, "v2")
    assert not [m for m in moves if m[0] == "adapter"], moves  # the final dir itself is never moved aside
    assert (final / "weights.bin").read_text() == "v2" and _siblings(final) == []


def test_without_exchange_an_error_between_the_two_renames_puts_the_previous_version_back(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    monkeypatch.setattr(atomic, "rename_exchange", lambda a, b: False)
    real = os.replace

    def second_rename_fails(src, dst):
        if Path(src).name.startswith(".adapter.tmp-"):
            raise OSError(5, "Input/output error (NFS)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="Input/output"):
        _write_version(final, "v2")
    assert (final / "weights.bin").read_text() == "v1"
    assert _siblings(final) == []  # the staging dir is removed, the previous version is back in place


def _in_the_window(monkeypatch, final: Path, act, times: int | None = 1) -> list:
    """Without RENAME_EXCHANGE, run ``act()`` (with the real ``os.replace``) right after the writer has set
    ``final`` aside, the first ``times`` times (None: every time); returns what each call returned."""
    monkeypatch.setattr(atomic, "rename_exchange", lambda a, b: False)
    real = os.replace
    results: list = []

    def replace(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(f".{final.name}.old-") and (times is None or len(results) < times):
            monkeypatch.setattr(os, "replace", real)
            results.append(act())
            monkeypatch.setattr(os, "replace", replace)

    monkeypatch.setattr(os, "replace", replace)
    return results


def test_without_exchange_a_reader_restoring_between_the_two_renames_does_not_fail_the_writer(tmp_path, monkeypatch):
    """A reader's ``recover()`` (``lora-dist export RUN`` reading the adapter) sees ``final`` missing between the
    writer's two renames and puts the previous version back; the writer sets it aside again and publishes."""
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    restored = _in_the_window(monkeypatch, final, lambda: recover(final, cleanup=False))
    _write_version(final, "v2")
    assert restored == [True]  # the reader did put v1 back in the window
    assert (final / "weights.bin").read_text() == "v2" and _siblings(final) == []


def test_without_exchange_another_writers_output_found_between_the_two_renames_is_kept(tmp_path, monkeypatch):
    """Only the version set aside is set aside again: an output another writer published in the window stays."""
    final = tmp_path / "adapter"
    _write_version(final, "v1")

    def other_writer():
        final.mkdir()
        (final / "weights.bin").write_text("other")

    _in_the_window(monkeypatch, final, other_writer)
    with pytest.raises(OSError):
        _write_version(final, "v2")
    assert (final / "weights.bin").read_text() == "other"
    assert _siblings(final) == []  # what this writer set aside was discarded, its staging dir removed


def test_without_exchange_a_reader_that_keeps_restoring_leaves_the_previous_version(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    _in_the_window(monkeypatch, final, lambda: recover(final, cleanup=False), times=None)
    with pytest.raises(OSError):
        _write_version(final, "v2")
    assert (final / "weights.bin").read_text() == "v1" and _siblings(final) == []


def test_without_exchange_the_replace_still_works(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "rename_exchange", lambda a, b: False)
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    _write_version(final, "v2")
    assert (final / "weights.bin").read_text() == "v2" and _siblings(final) == []


_KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import lora_dist.atomic as atomic

    atomic.rename_exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE (some NFS)
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(".adapter.old-"):  # the previous version is set aside: die right here
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    with atomic.writing_dir(Path(sys.argv[1]), replace=True) as staging:
        (staging / "weights.bin").write_text("v2")
""")


def test_sigkill_between_the_two_renames_is_repaired_by_a_reader_and_by_the_next_writer(tmp_path):
    """Issue 15 item 8: a kill between the renames leaves ``.adapter.old-*`` and no ``adapter/``; a reader's
    ``recover(cleanup=False)`` puts it back (leaving the staging dir alone), the next writer also cleans up."""
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(final)], cwd=REPO, env=quiet_env())
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists()
    left = _siblings(final)
    assert [n for n in left if n.startswith(".adapter.old-")] and [n for n in left if n.startswith(".adapter.tmp-")]

    assert recover(final, cleanup=False) is True  # what a reader does
    assert (final / "weights.bin").read_text() == "v1"
    assert [n for n in _siblings(final) if n.startswith(".adapter.tmp-")]  # a reader never removes staging dirs
    assert recover(final, cleanup=False) is False

    _write_version(final, "v3")  # the next writer cleans up what is left
    assert (final / "weights.bin").read_text() == "v3" and _siblings(final) == []


def test_the_next_writer_repairs_before_writing(tmp_path):
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(final)], cwd=REPO, env=quiet_env())
    assert not final.exists()
    with writing_dir(final, replace=True) as staging:
        assert (final / "weights.bin").read_text() == "v1"  # put back before the new version is written
        (staging / "weights.bin").write_text("v2")
    assert (final / "weights.bin").read_text() == "v2" and _siblings(final) == []


def test_recover_without_leftovers_does_nothing(tmp_path):
    assert recover(tmp_path / "missing-parent" / "adapter") is False
    (tmp_path / "unrelated").mkdir()
    assert recover(tmp_path / "adapter") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated"]


def test_a_set_aside_copy_another_reader_moved_back_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Two readers recovering at once (two `lora-dist export RUN` right after a killed publish): the other one put
    the copy back between this one's listing and its sort, whose stat raised FileNotFoundError, a traceback."""
    final = tmp_path / "adapter"
    aside = tmp_path / ".adapter.old-0badcafe"
    aside.mkdir()
    (aside / "weights.bin").write_text("v1")
    real = atomic._tokened

    def listed_then_moved_back(path, prefix):
        found = real(path, prefix)
        if aside in found and aside.exists():
            os.replace(aside, final)  # the other reader, right after this one listed the dir
        return found

    monkeypatch.setattr(atomic, "_tokened", listed_then_moved_back)
    assert recover(final) is False  # nothing left to put back, and no error
    assert (final / "weights.bin").read_text() == "v1"


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                        (0o002, 0o775, 0o664)])
def test_published_dirs_and_files_get_the_umask_permissions(tmp_path, umask, mask, dir_mode, file_mode):
    """Issue 15 item 11: not 0700/0600 (mkdtemp, safetensors), so a teammate can read a shared run."""
    umask(mask)
    final = tmp_path / "out"
    staging = staging_dir(final)
    f = staging / "model.safetensors"
    f.write_text("x")
    f.chmod(0o600)  # what safetensors' save_file creates
    (staging / "sub").mkdir(mode=0o700)
    (staging / "sub" / "a").write_text("y")
    publish_dir(staging, final)
    assert final.stat().st_mode & 0o777 == dir_mode
    assert (final / "sub").stat().st_mode & 0o777 == dir_mode
    assert (final / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (final / "sub" / "a").stat().st_mode & 0o777 == file_mode
    write_text_atomic(tmp_path / "latest", "step-000001\n")
    assert (tmp_path / "latest").stat().st_mode & 0o777 == file_mode
    assert atomic.umask() == mask


def test_write_text_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    write_text_atomic(target, "step-000002\n")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # where a network filesystem reports a failed write
    with pytest.raises(OSError):
        write_text_atomic(target, "step-000004\n")
    assert target.read_text() == "step-000002\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


_HOLDS_A_MARK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lora_dist.atomic import WriterMark

    mark = WriterMark(Path(sys.argv[1]))
    (mark.staging / "part.safetensors").write_text("half")
    print(mark.staging, flush=True)
    time.sleep(600)
""")


def _locked(path: Path) -> bool:
    """Whether some open file description holds an flock on ``path``."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_sweep_keeps_a_live_writers_staging_dir_and_removes_a_dead_ones(tmp_path):
    """``lora-dist merge --out O`` takes no lock: a staging dir is removed only once its writer's flock is free."""
    final = tmp_path / "merged"
    unmarked = staging_dir(final)  # a writer on a filesystem without flock: never removed
    proc = subprocess.Popen([sys.executable, "-c", _HOLDS_A_MARK, str(final)], cwd=REPO, env=quiet_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        live = Path(proc.stdout.readline().strip())
        (mark,) = tmp_path.glob(".merged.writer-*")
        assert _locked(mark) and mark.name.split("-")[-1] == live.name.split("-")[-1]
        assert sweep_abandoned(final) == []
        assert live.is_dir() and unmarked.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert sweep_abandoned(final) == [live]  # killed: the kernel dropped its lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [unmarked.name]  # the mark went with it


def test_a_writer_mark_is_held_until_released_and_never_inside_the_staging_dir(tmp_path):
    final = tmp_path / "merged"
    mark = WriterMark(final)
    assert list(mark.staging.iterdir()) == []  # published as is: no file of the mark's in it
    assert mark.path.parent == tmp_path and _locked(mark.path)
    assert sweep_abandoned(final) == [] and mark.staging.is_dir()
    publish_dir(mark.staging, final)
    assert _locked(mark.path)  # held through the publish
    mark.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_child_forked_by_the_writer_does_not_keep_its_mark_locked(tmp_path):
    """The token cache's build forks its tokenization workers after it made its mark: each held the locked file
    description too, so a build killed outright stayed "live" while a worker lived (one stuck in a chunk: for
    good), and its staging dir was never swept."""
    mark = WriterMark(tmp_path / "entry")
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # a worker: lives on after the writer (fork's hooks ran before it returned here)
        os.write(ready, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"
        os.close(mark._fd)  # the writer dies: its own copy is gone
        mark._fd = None
        assert not _locked(mark.path)
        assert sweep_abandoned(tmp_path / "entry") == [mark.staging]
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)


def test_a_mark_left_by_a_writer_killed_after_its_publish_is_swept(tmp_path):
    final = tmp_path / "merged"
    orphan = tmp_path / ".merged.writer-0badf00d"
    orphan.write_text("")  # its writer published, then died before removing it: nobody holds it
    assert sweep_abandoned(final) == [] and not orphan.exists()


def test_a_mark_whose_dir_could_not_be_removed_stays_for_the_next_sweep(tmp_path):
    final = tmp_path / "merged"
    mark = WriterMark(final)
    (mark.staging / "part.safetensors").write_text("half")
    mark.release()  # the writer failed and could not remove its dir (a busy NFS file...)
    assert mark.path.exists() and not _locked(mark.path)
    assert sweep_abandoned(final) == [mark.staging]
    assert list(tmp_path.iterdir()) == []


def test_names_holding_glob_characters_or_other_outputs_prefixes_are_kept_apart(tmp_path, monkeypatch):
    """``run[1]``'s leftovers are found (no glob), and ``a``'s never include those of ``a.tmp-b``."""
    odd = tmp_path / "run[1]"
    _write_version(odd, "v1")
    (odd).rename(tmp_path / ".run[1].old-0a1b2c3d")
    (tmp_path / ".run1.old-0a1b2c3d").mkdir()  # what `run[1]` would match as a glob
    assert recover(odd, cleanup=False) and (odd / "weights.bin").read_text() == "v1"
    assert (tmp_path / ".run1.old-0a1b2c3d").is_dir()

    other = WriterMark(tmp_path / "a.tmp-b")  # its staging dir .a.tmp-b.tmp-XXXX starts with .a.tmp-
    recover(tmp_path / "a")  # a writer of `a` cleans up only `a`'s leftovers
    assert other.staging.is_dir()
    other.release()


def test_a_replaced_version_is_deleted_under_a_name_recover_never_restores(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    _write_version(final, "v1")
    monkeypatch.setattr(atomic, "rename_exchange", lambda a, b: False)
    deleted = []
    real = atomic._remove

    def cut_short(path):  # the removal of the replaced version dies at once
        deleted.append(path.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_remove", cut_short)
    with pytest.raises(KeyboardInterrupt):
        _write_version(final, "v2")
    monkeypatch.setattr(atomic, "_remove", real)
    assert deleted and deleted[0].startswith(".adapter.del-")
    assert (final / "weights.bin").read_text() == "v2"
    assert recover(final, cleanup=False) is False  # nothing under an .old- name to put back
    final.rename(tmp_path / ".adapter.old-0a1b2c3d")  # even with the final dir gone
    assert recover(final, cleanup=False) and (final / "weights.bin").read_text() == "v2"
    assert sweep_abandoned(final) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
