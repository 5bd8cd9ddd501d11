"""`lora-dist export RUN_DIR` and `export.merged=true` write the same merged checkpoint as the offline merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from distutil import lora_dist, ranks
from lora_dist.demo import write_demo_data
from lora_dist.export.sources import MERGED_FROM_KEY

pytestmark = pytest.mark.dist


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    root = tmp_path_factory.mktemp("runexport")
    data = write_demo_data(root / "data.jsonl", n=100)
    out = root / "run"
    ranks(2, "-m", "lora_dist.cli", "train", f"model.path={base}", f"data.path={data}", f"output.dir={out}",
          "train.steps=3", "train.seq_len=32", "train.lr=1e-2", "lora.target_modules=all-linear",
          "export.merged=true", "export.dtype=float32", "export.max_shard_size=100KB")
    offline = root / "offline"
    lora_dist("merge", "--base", str(base), "--adapter", str(out / "adapter"), "--out", str(offline), "--dtype", "fp32")
    return {"base": base, "out": out, "offline": offline, "root": root}


def test_end_of_training_export_equals_offline_merge(run):
    merged, offline = _tensors(run["out"] / "merged"), _tensors(run["offline"])
    assert set(merged) == set(offline)
    assert all(torch.equal(merged[k], offline[k]) for k in merged)
    assert len(list((run["out"] / "merged").glob("model-*.safetensors"))) > 1  # max_shard_size split it


@pytest.mark.parametrize("nproc, strategy", [(2, "zero3"), (3, "fsdp2"), (1, "none")])
def test_export_of_a_finished_run(run, nproc, strategy):
    dst = run["root"] / f"export-{strategy}-{nproc}"
    args = ["export", str(run["out"]), "--out", str(dst), "--dtype", "float32"]
    if nproc == 1:
        done = lora_dist(*args)
    else:
        cfg = run["out"] / "config.json"
        text = cfg.read_text()
        try:
            cfg.write_text(text.replace('"strategy": "fsdp2"', f'"strategy": "{strategy}"'))
            done = ranks(nproc, "-m", "lora_dist.cli", *args)
        finally:
            cfg.write_text(text)
    assert done.stdout.count(f"merged checkpoint written to {dst}") == 1  # once, by rank 0
    exported, offline = _tensors(dst), _tensors(run["offline"])
    assert set(exported) == set(offline)
    for k in offline:
        assert torch.equal(exported[k], offline[k]), k
    proc = lora_dist("verify", str(dst), "--base", str(run["base"]), "--adapter", str(run["out"] / "adapter"))
    assert "OK" in proc.stdout


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_bf16_compute_under_deepspeed_merges_the_fp32_adapter_into_the_fp32_base(run, strategy):
    """DeepSpeed's bf16 mode casts the whole module, LoRA and a float32 base (``model.dtype``) included, to bf16 and
    steps fp32 masters. The merged export is still base + adapter as the files hold them, as fsdp2 and ddp write it:
    the fp32 masters merged into the base files' weights, at the end of training and from ``lora-dist export``."""
    out = run["root"] / f"bf16-{strategy}"
    ranks(2, "-m", "lora_dist.cli", "train", f"model.path={run['base']}", f"data.path={run['root'] / 'data.jsonl'}",
          f"output.dir={out}", "train.steps=3", "train.seq_len=32", "train.lr=1e-2", "lora.target_modules=all-linear",
          f"parallel.strategy={strategy}", "parallel.mixed_precision=bfloat16", "export.merged=true",
          "export.dtype=float32")
    offline = run["root"] / f"bf16-{strategy}-offline"
    lora_dist("merge", "--base", str(run["base"]), "--adapter", str(out / "adapter"), "--out", str(offline),
              "--dtype", "fp32")
    want = _tensors(offline)
    exports = [out / "merged"]
    if strategy == "zero3":  # a finished run exported on its own ranks (its config says zero3, bf16)
        exports.append(run["root"] / "bf16-zero3-export")
        ranks(2, "-m", "lora_dist.cli", "export", str(out), "--out", str(exports[-1]), "--dtype", "float32")
    for merged in exports:
        got = _tensors(merged)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), f"{merged.name}: {k}"
        with safe_open(str(next(merged.glob("*.safetensors"))), "pt") as f:
            assert f.metadata()[MERGED_FROM_KEY] == "float32"  # so `verify` holds it to fp32's tolerance
