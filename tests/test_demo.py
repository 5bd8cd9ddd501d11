"""The README's main job, `lora-dist demo`, and the CLI's help."""

from __future__ import annotations

import json

import pytest

from distutil import lora_dist

REQUIRED_KEYS = ("model.path", "data.path", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
                 "parallel.strategy", "train.steps", "train.micro_batch_size", "train.grad_accum", "train.lr",
                 "train.seq_len", "train.seed", "checkpoint.every", "export.merged", "output.dir")


@pytest.mark.dist
def test_demo_trains_on_two_processes_and_exports_a_verified_merged_checkpoint(tmp_path):
    proc = lora_dist("demo", "--out", str(tmp_path), timeout=600)
    assert "demo OK" in proc.stdout, proc.stdout[-2000:]
    assert "verified" in proc.stdout and "all finite" in proc.stdout
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, 41))  # configs/demo.yaml: 40 steps
    assert all(h["tokens_per_s"] > 0 and h["memory_gb"] > 0 and h["grad_norm"] > 0 for h in steps)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 5 and evals[-1] < evals[0]  # every 10 steps, and at the end
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert (run / "adapter" / "adapter_config.json").is_file()
    index = json.loads((run / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # export.max_shard_size=500KB splits the files
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000040"  # every 20, and the last step


@pytest.mark.dist
def test_demo_fails_when_the_loss_does_not_go_down(tmp_path):
    proc = lora_dist("demo", "--out", str(tmp_path), "train.steps=2", "train.eval_every=0", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lora-dist demo: error:")]
    assert len(errors) == 1 and "did not go down" in errors[0], proc.stderr[-2000:]


def test_help_describes_the_config_keys():
    top = lora_dist("--help").stdout
    assert "lora-dist train --help" in top and "section.key=value" in top
    for command in ("train", "demo", "export", "merge", "verify", "slurm", "plan", "bench"):
        assert command in top
    train = lora_dist("train", "--help").stdout
    for key in REQUIRED_KEYS:
        line = next((line for line in train.splitlines() if line.strip().startswith(key)), None)
        assert line is not None and len(line.split()) > 2, f"{key} is not described in train --help"


def test_demo_outside_a_checkout_says_so_and_builds_nothing(tmp_path, monkeypatch, capsys):
    from lora_dist import cli

    monkeypatch.setattr(cli, "DEMO_CONFIG", tmp_path / "site-packages" / "configs" / "demo.yaml")
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "source checkout" in err and "pip install -e" in err
    assert not (tmp_path / "out").exists()
