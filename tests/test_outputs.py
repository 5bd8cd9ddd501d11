"""What an output may be (lora_dist.outputs): run dirs by marker, never an input, one run at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distutil import REPO, quiet_env
from lora_dist.errors import USER_ERRORS
from lora_dist.outputs import (
    RUN_LOCK,
    RUN_MARKER,
    OutputDirError,
    OutputError,
    RunLock,
    check_not_an_input,
    prepare_run_dir,
    read_run_marker,
    write_failure,
)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (hidden ones too) with its bytes; None for dirs."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_output_errors_are_user_errors():
    assert issubclass(OutputError, USER_ERRORS) and issubclass(OutputDirError, USER_ERRORS)


def test_a_new_dir_becomes_a_run_dir_and_is_reused(tmp_path):
    out = tmp_path / "runs" / "a"
    marker = prepare_run_dir(out, [])
    assert len(marker["run_id"]) == 16 and read_run_marker(out) == marker
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER]  # the write probe is gone
    assert prepare_run_dir(out, []) == marker  # the same run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_run_dir(empty, [])["run_id"] != marker["run_id"]


def test_a_legacy_run_dir_is_recognised_by_its_layout_and_gets_a_marker(tmp_path):
    out = tmp_path / "old-run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model": {}, "lora": {}, "train": {}, "output": {}}))
    marker = prepare_run_dir(out, [])
    assert read_run_marker(out) == marker


@pytest.mark.parametrize("layout, needle", [
    ({"notes.txt": "mine"}, "holds files lora_dist did not write (notes.txt"),
    ({"config.json": '{"model_type": "llama"}', "model.safetensors": "w"}, "is a model dir"),
    ({"adapter_config.json": "{}", "adapter_model.safetensors": "w"}, "is an adapter dir"),
    ({"config.json": "{}", "adapter/important.txt": "mine", "checkpoints/step-000002/mine.txt": "mine"},
     "holds files lora_dist did not write"),
])
def test_a_dir_of_someone_elses_files_is_refused_and_left_untouched(tmp_path, layout, needle):
    out = tmp_path / "mine"
    for name, text in layout.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _tree(out)
    with pytest.raises(OutputError, match="choose a new or empty output.dir") as refused:
        prepare_run_dir(out, [])
    assert needle in str(refused.value)
    assert _tree(out) == before


@pytest.mark.parametrize("where, relation", [("model", "is"), ("model/run", "is inside"), ("", "contains"),
                                             ("data.jsonl", "is"), ("link-to-model", "is")])
def test_an_output_that_is_touches_or_holds_an_input_is_refused(tmp_path, where, relation):
    model = _model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hi"}\n')
    (tmp_path / "link-to-model").symlink_to(model)
    before = _tree(tmp_path)
    out = tmp_path / where if where else tmp_path
    with pytest.raises(OutputError, match=f"{relation} the input") as refused:
        prepare_run_dir(out, [model, data])
    assert "outside every input" in str(refused.value)
    assert _tree(tmp_path) == before


def test_check_not_an_input_skips_unset_inputs_and_allows_siblings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an unset input read as a path ("" is the cwd) would contain the output
    inputs = [None, "", tmp_path / "base", tmp_path / "data.jsonl"]
    assert check_not_an_input(tmp_path / "run", inputs, "output.dir") is None  # siblings and unset inputs pass
    with pytest.raises(OutputError):  # the same check refuses an output that is one of them
        check_not_an_input(tmp_path / "base", inputs, "output.dir")


@pytest.fixture
def home_and_cwd(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """``(home, cwd)``: ``$HOME`` and the working dir, two empty dirs under ``tmp_path``."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home, cwd


@pytest.mark.parametrize("how", ["override", "yaml"])
def test_output_dir_under_home_is_made_there_and_never_as_a_dir_named_tilde(home_and_cwd, how):
    """output.dir=~/runs/a (the shell leaves a ~ after = alone; YAML too) is the home's runs/a: it made ./~/runs/a,
    a dir that rm -rf ~ then removes the home with."""
    from lora_dist.config import load_config

    home, cwd = home_and_cwd
    if how == "override":
        cfg = load_config(None, ["output.dir=~/runs/a"])
    else:
        (cwd.parent / "run.yaml").write_text("output:\n  dir: ~/runs/a\n")
        cfg = load_config(cwd.parent / "run.yaml")
    marker = prepare_run_dir(cfg.output.dir, [])
    assert read_run_marker(home / "runs" / "a") == marker
    assert not (cwd / "~").exists()


def test_an_output_starting_with_tilde_is_refused_and_nothing_is_created(home_and_cwd):
    """A path that reaches the outputs unexpanded (an API call, --out=~/x) is refused rather than written as ./~."""
    home, cwd = home_and_cwd
    for out in ("~/runs/a", "~other/runs/a"):
        with pytest.raises(OutputError, match=f"output.dir '{out}' starts with ~, which nothing expanded") as err:
            prepare_run_dir(out, [])
        assert "\n" not in str(err.value)
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


def test_a_file_or_a_dangling_link_is_refused(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_run_dir(f, [])
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="dangling symlink"):
        prepare_run_dir(link, [])
    assert not (tmp_path / "nowhere").exists()


def test_an_unwritable_output_dir_is_one_line_and_nothing_is_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="is not writable .*choose another output.dir"):
        prepare_run_dir(blocker / "run", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _prepare_in_child(out: str, barrier, results) -> None:
    barrier.wait()
    results.put(prepare_run_dir(out, [])["run_id"])


def test_two_first_runs_racing_into_one_new_dir_agree_on_one_run_id(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    children = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path / "run"), barrier, results)) for _ in range(4)]
    for c in children:
        c.start()
    ids = {results.get(timeout=60) for _ in children}
    for c in children:
        c.join(timeout=60)
    assert len(ids) == 1 and ids == {read_run_marker(tmp_path / "run")["run_id"]}


def test_one_run_at_a_time(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, [])
    with RunLock(out):
        with pytest.raises(OutputError, match=rf"is in use by another lora-dist run \(pid {os.getpid()} on "):
            RunLock(out).acquire()
    with RunLock(out):  # released: the next run may go
        pass


def test_a_filesystem_without_flock_runs_unlocked_and_says_so(tmp_path, monkeypatch, caplog):
    """Lustre mounted noflock fails flock() with ENOLCK: the run goes on (it cannot be locked anywhere), with a warning
    that a second run into the dir would not be refused."""
    import errno
    import fcntl

    out = tmp_path / "run"
    prepare_run_dir(out, [])

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING", logger="lora_dist.outputs"):
        RunLock(out).acquire().release()
    assert "cannot be locked on this filesystem (No locks available)" in caplog.text
    assert "give each run its own output.dir" in caplog.text


def test_a_killed_run_never_blocks_the_next(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, [])
    script = ("import sys, time; from lora_dist.outputs import RunLock; "
              "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=REPO, env=quiet_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"pid {holder.pid} on"):
            RunLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    deadline = time.time() + 10
    while True:
        try:
            RunLock(out).acquire().release()
            break
        except OutputError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    assert (out / RUN_LOCK).is_file()


def test_write_failure_names_a_full_disk_and_the_fix():
    error = write_failure(OSError(28, "No space left on device"), "checkpoint step-000004 in /r/checkpoints",
                          "the previous checkpoint step-000002 and latest are intact")
    assert isinstance(error, OutputDirError)
    assert str(error) == ("cannot write checkpoint step-000004 in /r/checkpoints (no space left on device); free space "
                          "or choose another output.dir; the previous checkpoint step-000002 and latest are intact")
    from_safetensors = write_failure(RuntimeError("Error while serializing: I/O error: No space left on device "
                                                  "(os error 28)"), "x", "y")
    assert "no space left on device" in str(from_safetensors)
    assert "Read-only file system" in str(write_failure(OSError(30, "Read-only file system"), "x", "y"))
