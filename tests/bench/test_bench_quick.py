"""``lora-dist bench --quick`` runs every configuration and writes sane, complete results."""

from __future__ import annotations

import json

import pytest

from distutil import lora_dist

pytestmark = pytest.mark.dist

CONFIGS = ("peft_accelerate_fsdp2", "lora_dist_fsdp2", "lora_dist_zero3", "lora_dist_ddp", "lora_dist_auto",
           "peft_accelerate_fsdp2_bf16", "lora_dist_fsdp2_bf16", "lora_dist_auto_bf16", "lora_dist_nf4", "lora_dist_nf4_all",
           "peft_accelerate_zero3", "full_ft_fsdp2")
#: The memory targets of the frozen-base work and their limits.
MEMORY_TARGETS = {"tensors <= 0.75x anchor, bf16 base": 0.75, "NF4 stored base bytes <= 0.3x bf16 base": 0.3,
                  "NF4 base bytes at the step's peak <= 0.3x bf16 base": 0.3, "NF4 tensors <= 0.55x anchor": 0.55}
TARGETS = ("train peak <= 0.6x DDP", "train peak <= anchor", "step time <= 1.0x anchor", "LoRA step <= 2.3x forward",
           "export peak <= model/W + largest + 10%", "offline merge <= 3x plain copy", "planner within 15%",
           "auto step <= 0.5x anchor (DDP fits)", *MEMORY_TARGETS)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    # the ranks forked from the bench's process (--launcher fork): the same measurements, without every rank's
    # ~10 s of imports; torchrun launches are the subset test's
    lora_dist("bench", "--quick", "--launcher", "fork", "--out", str(out), "--work-dir", str(root / "work"),
              timeout=600)
    return out, json.loads((out / "results.json").read_text())


def test_every_configuration_ran_with_sane_numbers(quick):
    _, results = quick
    (size,) = results["summary"]["sizes"]
    assert not size["failed"]
    rows = size["rows"]
    assert set(rows) == set(CONFIGS)
    for name, row in rows.items():
        assert row["baseline_rss"] > 0 and row["peak_rss"] > row["baseline_rss"], name
        # (no ordering of forward and step times: on the smoke model both are a few ms, within the machine's noise)
        assert 0 < row["peak_tensor"] < 1e10 and 0 < row["step_s"] < 60 and 0 < row["forward_s"] < 60, name
        assert row["tokens_per_s"] > 0 and row["comm_bytes"] > 0 and row["step_cpu_s"] > 0, name
        assert row["x_anchor"]["step_s"] > 0
    assert rows["peft_accelerate_fsdp2"]["x_anchor"]["peak_rss"] == 1.0
    total = results["sizes"][0]["configs"]["full_ft_fsdp2"]["ranks"][0]["params"]
    assert total["trainable"] == total["total"]
    for name in ("lora_dist_zero3", "lora_dist_ddp", "lora_dist_auto", "lora_dist_fsdp2_bf16", "lora_dist_auto_bf16",
                 "lora_dist_nf4", "lora_dist_nf4_all", "peft_accelerate_fsdp2", "peft_accelerate_fsdp2_bf16"):
        assert rows[name]["trainable_params"] == rows["lora_dist_fsdp2"]["trainable_params"] < total["total"], name


def test_the_frozen_base_in_bf16_and_nf4_against_the_bf16_anchor(quick):
    """The bf16 rows are compared with the anchor in bf16; the base each rank holds is half the fp32 one's in bf16
    and smaller again in NF4 (embedding and head stay bf16: on the quick model they are most of the base); the
    memory targets are computed, and auto names what it chose."""
    _, results = quick
    rows = results["summary"]["sizes"][0]["rows"]
    for name in ("lora_dist_fsdp2_bf16", "lora_dist_auto_bf16", "lora_dist_nf4", "lora_dist_nf4_all"):
        assert rows[name]["anchor"] == "peft_accelerate_fsdp2_bf16", name
    assert rows["lora_dist_fsdp2"]["anchor"] == "peft_accelerate_fsdp2"
    fp32, bf16, nf4 = (rows[c]["base_bytes"] for c in ("lora_dist_fsdp2", "lora_dist_fsdp2_bf16", "lora_dist_nf4"))
    assert bf16 == fp32 // 2 and nf4 < bf16, (fp32, bf16, nf4)
    # the quick model's 2048 x 256 embedding and head are whole NF4 groups per rank: quantized with
    # model.quantize_embeddings, the whole base is NF4 but the norms
    nf4_all = rows["lora_dist_nf4_all"]["base_bytes"]
    assert nf4_all < 0.3 * bf16 < nf4, (bf16, nf4, nf4_all)
    assert rows["peft_accelerate_fsdp2_bf16"]["base_bytes"] == bf16  # the same bf16 base, sharded the same way
    # the memory targets (at this size the activations dwarf the base: they are computed here, the full run's pass
    # or fail) are the ratios of the rows they name, each passing exactly within its limit
    targets = {(t["target"], t["subject"]): t for t in results["summary"]["targets"]}
    anchor, lora_bf16 = rows["peft_accelerate_fsdp2_bf16"], rows["lora_dist_fsdp2_bf16"]
    want = {("tensors <= 0.75x anchor, bf16 base", "lora_dist fsdp2, bf16 base"):
            lora_bf16["peak_tensor"] / anchor["peak_tensor"]}
    for name, label in (("lora_dist_nf4", "lora_dist fsdp2, NF4 base"),
                        ("lora_dist_nf4_all", "lora_dist fsdp2, NF4 base + embedding/head")):
        row = rows[name]
        want["NF4 tensors <= 0.55x anchor", label] = row["peak_tensor"] / anchor["peak_tensor"]
        want["NF4 stored base bytes <= 0.3x bf16 base", label] = row["base_bytes"] / bf16
        want["NF4 base bytes at the step's peak <= 0.3x bf16 base", label] = (
            (row["base_bytes"] + row["peak_base_copies"]) / (bf16 + lora_bf16["peak_base_copies"]))
    assert {key for key in targets if key[0] in MEMORY_TARGETS} == set(want)
    for (kind, subject), value in want.items():
        target = targets[kind, subject]
        assert target["value"] == pytest.approx(value), target
        assert target["result"] == ("PASS" if value <= MEMORY_TARGETS[kind] else "FAIL"), target
    # a smaller base holds fewer tensors through the step at any size
    assert rows["lora_dist_nf4_all"]["peak_tensor"] < rows["lora_dist_nf4"]["peak_tensor"] < lora_bf16["peak_tensor"]
    auto = {t["subject"]: t["detail"] for t in results["summary"]["targets"]
            if t["target"] == "auto step <= 0.5x anchor (DDP fits)"}
    assert set(auto) == {"lora_dist auto", "lora_dist auto, bf16 base"}
    assert "vs anchor " in auto["lora_dist auto"] and "vs bf16 anchor " in auto["lora_dist auto, bf16 base"]
    for detail in auto.values():
        assert "auto chose ddp without selective recompute" in detail


def test_communication_counts_are_exact_where_they_can_be(quick):
    """DDP and FSDP2 LoRA (ZeRO-1 over the LoRA, the default) reduce-scatter the LoRA gradients (fp32, each bucket
    padded to a multiple of W) and all-gather the update; all-reduce only three 8-byte scalars (the step's token
    count, its loss, the squared gradient norm). FSDP2 also reduce-scatters the input embedding's rows of every
    rank's tokens (its lookup on the vocabulary shards), exactly, and the loss's gradient of the hidden states of
    the tokens that carry a loss (at most every token)."""
    _, results = quick
    configs = results["sizes"][0]["configs"]
    world = 2
    spec, options = results["sizes"][0]["spec"], results["options"]
    rows = world * options["micro_batch"] * options["seq_len"] * spec["hidden"] * 4  # every rank's tokens, fp32
    exact = {"lora_dist_ddp": 0, "lora_dist_fsdp2": rows}  # the embedding's lookup
    loss_grad = {"lora_dist_ddp": 0, "lora_dist_fsdp2": rows}  # the loss on the head's vocabulary shards, at most
    for name in ("lora_dist_ddp", "lora_dist_fsdp2"):
        rank = configs[name]["ranks"][0]
        payload = rank["instrumented_step"]["comm"]["payload_bytes"]
        lora_bytes = rank["params"]["trainable"] * 4 + exact[name]
        assert lora_bytes + min(loss_grad[name], 1) <= payload["reduce_scatter"], name  # and some loss gradient
        assert payload["reduce_scatter"] <= lora_bytes + loss_grad[name] + 4 * (world - 1) * 64, name  # < 64 buckets
        assert payload["all_gather"] >= rank["params"]["trainable"] * 4, name  # the update, gathered back
        assert payload["all_reduce"] == 3 * 8, name
        assert not rank["instrumented_step"]["comm"]["unrecognized_ops"]
    fsdp2 = configs["lora_dist_fsdp2"]["ranks"][0]["instrumented_step"]["comm"]["payload_bytes"]
    plan = results["sizes"][0]["plans"]["lora_dist_fsdp2"]
    # forward gathers the whole base at least once, but the output head and the input embedding (the largest
    # tensors): the loss and the lookup run on their vocabulary shards
    assert fsdp2["all_gather"] >= plan["model_bytes"] - 2 * plan["largest_tensor_bytes"]


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


def test_a_subset_without_lora_dist_fsdp2_measures_no_export_and_fails_nothing(tmp_path):
    """The one-GPU check of scripts/gpu_check.py runs such a subset, profiled, under torchrun (the default
    launcher): the exports and the merge start from lora_dist_fsdp2's adapter, so without it they are left out, not
    counted as failed launches."""
    out = tmp_path / "results"
    lora_dist("bench", "--quick", "--nproc", "1", "--configs", "peft_accelerate_fsdp2_bf16", "lora_dist_fsdp2_bf16",
              "lora_dist_auto_bf16", "--profile", "--out", str(out), "--work-dir", str(tmp_path / "work"), timeout=300)
    results = json.loads((out / "results.json").read_text())
    size, summary = results["sizes"][0], results["summary"]["sizes"][0]
    assert set(size["configs"]) == {"peft_accelerate_fsdp2_bf16", "lora_dist_fsdp2_bf16", "lora_dist_auto_bf16"}
    assert size["export_cli"] == {} and "merge" not in size
    assert summary["failed"] == {}
    assert summary["rows"]["lora_dist_fsdp2_bf16"]["x_anchor"]["step_s"] > 0
    assert "None measured: the exports and the merge" in (out / "results.md").read_text()
    # --profile: one table per configuration, the step's matmuls in it; none left in results.json
    for config in size["configs"]:
        table = (out / "profiles" / f"llama-tiny-{config}.txt").read_text()
        assert "Self CPU" in table and ("aten::mm" in table or "aten::addmm" in table), table[:2000]
    assert "profile" not in json.dumps(size["configs"])
    # on a CPU each profiled step splits into matmuls, attention and the rest, and the auto target says its floor
    for name, row in summary["rows"].items():
        times = row["self_times"]
        assert 0 < times["matmul"] and 0 < times["attention"] and times["matmul"] + times["attention"] < times["total"]
    rows = summary["rows"]
    auto_times = rows["lora_dist_auto_bf16"]["self_times"]
    floor = (auto_times["matmul"] + auto_times["attention"]) / rows["peft_accelerate_fsdp2_bf16"]["self_times"]["total"]
    (auto,) = [t for t in results["summary"]["targets"] if t["target"].startswith("auto step")]
    assert f"its matmuls + attention alone are {floor:.2f}x the bf16 anchor's profiled step" in auto["detail"]


def test_one_rank_measures_the_export_command_it_runs(tmp_path):
    """On one process `lora-dist export RUN_DIR` streams base + adapter from disk (merge_offline), not the
    sharded export_merged: that is the phase measured (the report once failed for want of it)."""
    out = tmp_path / "results"
    lora_dist("bench", "--quick", "--launcher", "fork", "--nproc", "1", "--configs", "lora_dist_fsdp2", "--out",
              str(out), "--work-dir", str(tmp_path / "work"), timeout=300)
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]["sizes"][0]
    assert summary["failed"] == {}
    cli = summary["exports"]["cli_fsdp2"]
    assert 0 < cli["wall_s"] < cli["command_wall_s"]
    assert all(m > 0 for m in cli["above_baseline_per_rank"]) and all(t > 0 for t in cli["own_tensor_per_rank"])
    # fsdp2 over one rank runs as one process (lora_dist.parallel.replicated_if_unsharded); the table says so
    assert "| lora_dist fsdp2 (fsdp2 over one shard rank ran as none) |" in (out / "results.md").read_text()
