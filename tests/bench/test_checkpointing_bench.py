"""``python -m bench checkpointing`` at a smoke-test size: each setting recomputes the blocks it names, holds less the
more blocks it checkpoints, as the planner predicts, and the table shows the rows."""

from __future__ import annotations

import json
import os

import pytest

from lora_dist.bench.checkpointing import SETTINGS, main


def test_each_setting_recomputes_its_blocks_and_holds_what_the_planner_says(tmp_path, capsys):
    out = tmp_path / "checkpointing.json"
    launch_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in launch_vars}
    assert main(["--size", "llama-tiny", "--tokens", "1024", "--rounds", "2", "--out", str(out),
                 "--work-dir", str(tmp_path / "work")]) == 0
    import torch.distributed as dist

    # The process group it started for itself is gone, and the launch variables it exported are restored: the
    # process goes on as before.
    assert not dist.is_initialized()
    assert {name: os.environ.get(name) for name in launch_vars} == before
    rows = json.loads(out.read_text())["rows"]
    assert [r["activation_checkpointing"] for r in rows] == list(SETTINGS)
    assert [r["checkpointed_blocks"] for r in rows] == [0, 1, 1, 2]  # 2 blocks: every 4th and every 2nd are block 0
    none, fourth, second, every = (r["peak_tensor_bytes"] for r in rows)
    assert none > second == fourth > every, (none, second, every)
    for row in rows:
        assert abs(row["planned_x_measured"] - 1) < 0.15, row
        assert row["step_s"] > 0 and len(row["step_s_each"]) == 1
    table = capsys.readouterr().out
    assert "| 2 | 1/2 |" in table and "| True | 2/2 |" in table


def test_one_round_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--rounds", "1", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert "--rounds must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
