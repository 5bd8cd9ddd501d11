"""``lora-dist bench --quick`` runs every configuration and writes sane, complete results."""

from __future__ import annotations

import json

import pytest

from distutil import lora_dist

pytestmark = pytest.mark.dist

CONFIGS = ("peft_accelerate_fsdp2", "lora_dist_fsdp2", "lora_dist_zero3", "lora_dist_ddp", "peft_accelerate_zero3",
           "full_ft_fsdp2")
TARGETS = ("train peak <= 0.6x DDP", "train peak <= anchor", "step time <= 1.0x anchor", "LoRA step <= 2.3x forward",
           "export peak <= model/W + largest + 10%", "offline merge <= 3x plain copy", "planner within 15%")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    lora_dist("bench", "--quick", "--out", str(out), "--work-dir", str(root / "work"), timeout=600)
    return out, json.loads((out / "results.json").read_text())


def test_every_configuration_ran_with_sane_numbers(quick):
    _, results = quick
    (size,) = results["summary"]["sizes"]
    assert not size["failed"]
    rows = size["rows"]
    assert set(rows) == set(CONFIGS)
    for name, row in rows.items():
        assert row["baseline_rss"] > 0 and row["peak_rss"] > row["baseline_rss"], name
        assert 0 < row["peak_tensor"] < 1e10 and 0 < row["step_s"] < 60 and 0 < row["forward_s"] < row["step_s"], name
        assert row["tokens_per_s"] > 0 and row["comm_bytes"] > 0 and row["step_cpu_s"] > 0, name
        assert row["x_anchor"]["step_s"] > 0
    assert rows["peft_accelerate_fsdp2"]["x_anchor"]["peak_rss"] == 1.0
    total = results["sizes"][0]["configs"]["full_ft_fsdp2"]["ranks"][0]["params"]
    assert total["trainable"] == total["total"]
    for name in ("lora_dist_fsdp2", "lora_dist_zero3", "lora_dist_ddp", "peft_accelerate_fsdp2"):
        assert rows[name]["trainable_params"] == rows["lora_dist_fsdp2"]["trainable_params"] < total["total"]


def test_communication_counts_are_exact_where_they_can_be(quick):
    """DDP and FSDP2 LoRA (ZeRO-1 over the LoRA, the default) reduce-scatter exactly the LoRA gradients (fp32,
    each bucket padded to a multiple of W) and all-gather the update; all-reduce only three 8-byte scalars (the
    step's token count, its loss, the squared gradient norm)."""
    _, results = quick
    configs = results["sizes"][0]["configs"]
    world = 2
    for name in ("lora_dist_ddp", "lora_dist_fsdp2"):
        rank = configs[name]["ranks"][0]
        payload = rank["instrumented_step"]["comm"]["payload_bytes"]
        lora_bytes = rank["params"]["trainable"] * 4
        assert lora_bytes <= payload["reduce_scatter"] <= lora_bytes + 4 * (world - 1) * 64, name  # < 64 buckets
        assert payload["all_gather"] >= payload["reduce_scatter"], name  # the update, gathered back
        assert payload["all_reduce"] == 3 * 8, name
        assert not rank["instrumented_step"]["comm"]["unrecognized_ops"]
    fsdp2 = configs["lora_dist_fsdp2"]["ranks"][0]["instrumented_step"]["comm"]["payload_bytes"]
    base_bytes = results["sizes"][0]["plans"]["lora_dist_fsdp2"]["model_bytes"]
    assert fsdp2["all_gather"] >= base_bytes  # forward gathers the whole base at least once


def test_exports_merge_targets_and_files(quick):
    out, results = quick
    size = results["summary"]["sizes"][0]
    assert set(size["exports"]) == {"lora_dist_fsdp2", "lora_dist_zero3", "peft_accelerate_fsdp2", "cli_fsdp2"}
    for export in size["exports"].values():
        assert export["wall_s"] > 0 and all(m > 0 for m in export["above_baseline_per_rank"])
    assert size["merge"]["merge_s"] > 0 and size["merge"]["copy_floor_s"] > 0
    kinds = {t["target"] for t in results["summary"]["targets"]}
    assert set(TARGETS) <= kinds
    assert {t["result"] for t in results["summary"]["targets"]} <= {"PASS", "FAIL", "reference", "n/a"}
    assert results["machine"]["cpu_cores"] and results["machine"]["torch"]
    md = (out / "results.md").read_text()
    assert "| configuration |" in md and "## Targets" in md and "lora_dist fsdp2" in md
    for png in ("memory.png", "speed_comm.png", "export.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
