"""Merged export onto real node-local disks: each rank sees its own directory at the output path.

tests/export/test_export.py only simulates node-local disks
(``lora_dist.export.writer.sees_probe`` patched on rank 1, all ranks on one
filesystem). Here each torchrun worker runs in its own mount namespace with
its own directory bind-mounted onto the same output path
(tests/dist_scripts/export_node_local.py), so rank 1 really cannot see rank
0's staging dir and the export must fall back to rank 0 collecting and
writing every file onto rank 0's disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dist_scripts.export_common import SCRIPTS
from distutil import ranks
from test_export import same_files, single_process_reference

from lora_dist.export import verify_checkpoint
from lora_dist.model_dir import SAFE_INDEX


def _namespaces_unavailable(scratch: Path) -> str | None:
    """Why private mount namespaces with bind mounts cannot be used here, or None (tried for real)."""
    if os.geteuid() != 0:
        return "needs root for mount namespaces and bind mounts"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed"
    src, dst = scratch / "src", scratch / "dst"
    src.mkdir(parents=True)
    dst.mkdir()
    for cmd in (["unshare", "--mount", "true"],
                ["unshare", "--mount", "--propagation", "private", "mount", "--bind", str(src), str(dst)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
    shutil.rmtree(scratch)
    return None


@pytest.mark.dist
def test_node_local_disks_fall_back_to_rank0_writing_everything(tiny_checkpoint, tmp_path):
    reason = _namespaces_unavailable(tmp_path / "ns-check")
    if reason:
        pytest.skip(f"node-local disks via mount namespaces: {reason}")
    base = tiny_checkpoint("llama", hidden=64)
    scratch = tmp_path / "scratch"  # the output path every rank uses; each rank mounts its own disk here
    scratch.mkdir()
    disks = [tmp_path / f"rank{r}-disk" for r in range(2)]
    for r, disk in enumerate(disks):
        disk.mkdir()
        (disk / ".disk-id").write_text(f"rank{r}")

    proc = ranks(2, str(SCRIPTS / "export_node_local.py"), str(base), str(tmp_path), "llama", timeout=240)
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    log = proc.stdout + proc.stderr

    # Each rank really had its own disk at the output path, and the mounts stayed in the ranks' namespaces.
    assert [r["disk_id"] for r in results] == ["rank0", "rank1"], log
    assert "rank 0 collects the merged tensors and writes the whole checkpoint" in log  # the user is told
    assert list(scratch.iterdir()) == []

    # mode="shared" refuses on every rank and leaves nothing behind on either disk.
    for r in results:
        assert r["shared_seen"] == [r is results[0]], r
        assert "ranks [1] cannot see" in r["shared_raised"] and "mode='gather'" in r["shared_raised"], r
    # mode="auto": rank 1 saw no probe, so rank 0 collected and wrote every byte.
    assert [r["auto_seen"] for r in results] == [[True], [False]]
    assert [r["auto_gather"] for r in results] == [[True], [True]]
    assert results[1]["auto_written"] == 0 and results[0]["auto_written"] > 0
    assert [r["out_exists_here"] for r in results] == [True, False]
    assert results[0]["out"] == results[1]["out"] == str(scratch / "merged")

    # Rank 0's disk: the complete checkpoint, equal to the single-process export, and nothing else.
    merged = disks[0] / "merged"
    assert sorted(p.name for p in disks[0].iterdir()) == [".disk-id", "merged"]
    assert (merged / SAFE_INDEX).is_file() and len(list(merged.glob("model-*-of-*.safetensors"))) > 1
    verify_checkpoint(merged, base, tmp_path / "adapter", sample=None)
    reference = single_process_reference(base, tmp_path / "adapter", tmp_path / "single")
    assert same_files(merged, reference)
    # Rank 1's disk: untouched (no checkpoint, no .tmp- staging dir, no probe).
    assert [p.name for p in disks[1].iterdir()] == [".disk-id"]
    assert results[1]["scratch_here"] == [".disk-id"]
