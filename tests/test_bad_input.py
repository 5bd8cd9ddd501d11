"""Bad input: one clear line naming the problem and the fix, no traceback, nothing half-written."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from distutil import REPO, lora_dist
from lora_dist.demo import write_demo_data


@pytest.fixture(scope="module")
def good(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    data = write_demo_data(root / "data.jsonl", n=100)
    return {"root": root, "base": base, "data": data}


def _train(good, out: Path, *overrides: str):
    args = ["train", f"model.path={good['base']}", f"data.path={good['data']}", f"output.dir={out}",
            "parallel.strategy=none", "train.steps=2", "train.seq_len=32", *overrides]
    return lora_dist(*args, check=False)


def _one_line_error(proc, *needles: str, command: str = "train") -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lora-dist {command}: error: "), last
    for needle in needles:
        assert needle in last, last
    return last


def _copy_base(good, dst: Path) -> Path:
    dst.mkdir()
    for f in Path(good["base"]).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_model_path(good, tmp_path):
    proc = _train(good, tmp_path / "o", f"model.path={tmp_path / 'nope'}")
    _one_line_error(proc, "not a directory", "model.path")


def test_missing_safetensors_file(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    (base / "model.safetensors").unlink()
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "no safetensors weights")


def test_pickled_weights_are_refused(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "never unpickles")


def test_corrupt_safetensors_file(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    f = base / "model.safetensors"
    f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "model.safetensors", "not a readable safetensors")


def test_truncated_safetensors_file(good, tmp_path):
    base = _copy_base(good, tmp_path / "base")
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line_error(_train(good, tmp_path / "o", f"model.path={base}"), "model.safetensors")


def test_unknown_config_key_suggests_the_closest(good, tmp_path):
    _one_line_error(_train(good, tmp_path / "o", "train.stpes=3"), "train.stpes", "train.steps")


def test_missing_config_file(good, tmp_path):
    proc = lora_dist("train", str(tmp_path / "missing.yaml"), check=False)
    _one_line_error(proc, "missing.yaml", "not found")


def test_missing_data_file(good, tmp_path):
    _one_line_error(_train(good, tmp_path / "o", f"data.path={tmp_path / 'none.jsonl'}"), "data.path", "not found")


def test_empty_data_file(good, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(_train(good, tmp_path / "o", f"data.path={empty}"), "holds no records")


def test_malformed_data_line(good, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"oops": 1}\n')
    _one_line_error(_train(good, tmp_path / "o", f"data.path={bad}"), "bad.jsonl:2")


def test_seq_len_beyond_model_positions(good, tmp_path):
    _one_line_error(_train(good, tmp_path / "o", "train.seq_len=100000"), "train.seq_len=100000", "positions")


def test_output_dir_not_writable(good, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(_train(good, tmp_path / "x", f"output.dir={blocker / 'run'}"), "output.dir", "not writable")


def test_adapter_shapes_not_matching_the_base(good, tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    assert _train(good, out).returncode == 0
    other = tiny_checkpoint("llama", hidden=32, layers=2)
    proc = lora_dist("merge", "--base", str(other), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m"),
                     check=False)
    _one_line_error(proc, "does not match", "different base", command="merge")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KB tmpfs: a real ENOSPC, not a patched write."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_during_export(good, tmp_path, tiny_disk):
    run = tmp_path / "run"
    assert _train(good, run, "export.merged=false").returncode == 0
    proc = lora_dist("export", str(run), "--out", str(tiny_disk / "merged"), check=False)
    _one_line_error(proc, "not enough space", "KB are free", "free space or choose another output dir", command="export")
    assert list(tiny_disk.iterdir()) == []  # nothing half-written left behind


def test_no_unpickling_anywhere_in_the_package():
    """Tensors are read with safetensors; a torch.load must say weights_only=True; no pickle module."""
    for path in (REPO / "lora_dist").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, path
