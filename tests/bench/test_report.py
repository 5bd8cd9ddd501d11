"""The benchmark's verdicts (``lora_dist.bench.report.summarize``) on made-up measurements with known answers: each
target's value is the ratio of the rows it names, and it passes exactly when the value is at most the limit."""

from __future__ import annotations

import pytest

from lora_dist.bench.report import summarize

GB = 1e9


def _rank(step_s: float, forward_s: float, anon: float, tensor: float, base_bytes: int = 0,
          notes: tuple[str, ...] = (), copies: int | None = None) -> dict:
    """One rank's record of a training launch, with the fields the report reads."""
    return {
        "train": {"step_times": [step_s * 1.1, step_s, step_s * 1.2], "step_cpu_times": [step_s] * 3,
                  "peak_anon": anon, "peak_rss": anon},
        "forward": {"times": [forward_s, forward_s * 1.1]},
        "instrumented_step": {"tensor_peak": tensor, "comm": {"wire_bytes": 1e6, "payload_total": 1e6, "calls": {}}},
        "baseline": {"anon": 0.1 * GB},
        "setup": {"wall_s": 1.0, "peak_anon": anon},
        "tokens_per_step": 1024,
        "params": {"trainable": 10, "total": 1000},
        "base_bytes": base_bytes,
        "reproduced": False,
        "notes": list(notes),
        # the planner's record (a planned copy of the base at the peak: ``copies``)
        **({"plan": {"total": tensor, "base_shard": base_bytes, "base_replicated": 0, "lora_params": 0, "lora_grads": 0,
                     "optimizer_state": 0, "activations": 0, "gathered": copies, "buffers": 0}}
           if copies is not None else {}),
    }


def _launch(*ranks: dict) -> dict:
    return {"ranks": list(ranks), "loadavg_before": 0.0, "loadavg_after": 0.0}


def _results(configs: dict) -> dict:
    return {"options": {"nproc": 2}, "sizes": [{"spec": {"name": "m"}, "num_params": 1000, "configs": configs}]}


def _targets(summary: dict) -> dict[tuple[str, str], dict]:
    return {(t["target"], t["subject"]): t for t in summary["targets"]}


def test_targets_are_the_ratios_they_name_and_pass_only_within_the_limit():
    configs = {
        # the anchor: step 2 s, 1 GB of tensors
        "peft_accelerate_fsdp2": _launch(_rank(2.0, 1.0, 2 * GB, 1.0 * GB), _rank(2.0, 1.0, 2 * GB, 1.0 * GB)),
        "lora_dist_ddp": _launch(_rank(0.9, 0.5, 2 * GB, 1.2 * GB), _rank(0.9, 0.5, 2 * GB, 1.2 * GB)),
        # fsdp2: slower than the anchor (FAIL), and the peak is its worst rank's (0.9 GB)
        "lora_dist_fsdp2": _launch(_rank(2.4, 1.0, 1 * GB, 0.6 * GB), _rank(2.4, 1.0, 1 * GB, 0.9 * GB)),
        # auto: 0.45x the anchor's step (PASS), 2.25x its forward (PASS)
        "lora_dist_auto": _launch(*[_rank(0.9, 0.4, 2 * GB, 1.2 * GB, notes=("auto chose ddp",))] * 2),
    }
    summary = summarize(_results(configs))
    targets = _targets(summary)
    step = targets["step time <= 1.0x anchor", "lora_dist fsdp2"]
    assert step["value"] == pytest.approx(1.2) and step["result"] == "FAIL"
    auto = targets["auto step <= 0.5x anchor (DDP fits)", "lora_dist auto"]
    assert auto["value"] == pytest.approx(0.45) and auto["result"] == "PASS" and "auto chose ddp" in auto["detail"]
    assert targets["step time <= 1.0x anchor", "lora_dist ddp"]["result"] == "PASS"
    ratio = targets["LoRA step <= 2.3x forward", "lora_dist auto"]
    assert ratio["value"] == pytest.approx(2.25) and ratio["result"] == "PASS"
    assert targets["LoRA step <= 2.3x forward", "lora_dist fsdp2"]["result"] == "FAIL"  # 2.4 s / 1.0 s
    tensors = targets["train peak <= 0.6x DDP", "lora_dist fsdp2 (tensors)"]
    assert tensors["value"] == pytest.approx(0.9 / 1.2) and tensors["result"] == "FAIL"
    rss = targets["train peak <= 0.6x DDP", "lora_dist fsdp2 (RSS)"]
    assert rss["value"] == pytest.approx(0.5) and rss["result"] == "PASS"
    assert targets["train peak <= anchor", "lora_dist fsdp2 (tensors)"]["value"] == pytest.approx(0.9)
    row = summary["sizes"][0]["rows"]["lora_dist_fsdp2"]
    assert row["step_s"] == pytest.approx(2.4)  # the fastest step of the slowest rank's, step by step
    assert row["x_anchor"]["peak_tensor"] == pytest.approx(0.9)


def test_a_target_exactly_at_its_limit_passes_and_no_anchor_means_no_ratio():
    configs = {
        "peft_accelerate_fsdp2": _launch(_rank(2.0, 1.0, 2 * GB, 1.0 * GB)),
        "lora_dist_auto": _launch(_rank(1.0, 0.5, 2 * GB, 1.0 * GB)),
    }
    auto = _targets(summarize(_results(configs)))["auto step <= 0.5x anchor (DDP fits)", "lora_dist auto"]
    assert auto["value"] == 0.5 and auto["result"] == "PASS"
    alone = summarize(_results({"lora_dist_auto": configs["lora_dist_auto"]}))
    assert not [t for t in alone["targets"] if "anchor" in t["target"]]
    assert "x_anchor" not in alone["sizes"][0]["rows"]["lora_dist_auto"]


def test_the_nf4_targets_compare_the_base_bytes_and_the_bf16_anchor():
    bf16 = _rank(1.0, 0.5, 1 * GB, 0.5 * GB, base_bytes=100, copies=0)
    configs = {
        "peft_accelerate_fsdp2_bf16": _launch(_rank(1.0, 0.5, 1 * GB, 1.0 * GB)),
        "lora_dist_fsdp2_bf16": _launch(bf16),
        "lora_dist_nf4": _launch(_rank(1.0, 0.5, 1 * GB, 0.6 * GB, base_bytes=45, copies=0)),  # blocks only: 0.45x
        # all: 0.26x stored, PASS; at the peak the loss's bf16 copy of the NF4 head's rows too: 0.46x, FAIL
        "lora_dist_nf4_all": _launch(_rank(1.0, 0.5, 1 * GB, 0.5 * GB, base_bytes=26, copies=20)),
    }
    targets = _targets(summarize(_results(configs)))
    stored = {t["subject"]: t for (n, _), t in targets.items() if n == "NF4 stored base bytes <= 0.3x bf16 base"}
    assert sorted((t["value"], t["result"]) for t in stored.values()) == [(0.26, "PASS"), (0.45, "FAIL")]
    peak = {t["subject"]: t for (n, _), t in targets.items()
            if n == "NF4 base bytes at the step's peak <= 0.3x bf16 base"}
    assert sorted((t["value"], t["result"]) for t in peak.values()) == [(0.45, "FAIL"), (0.46, "FAIL")]
    memory = {t["subject"]: t for (name, _), t in targets.items() if name == "NF4 tensors <= 0.55x anchor"}
    assert sorted((t["value"], t["result"]) for t in memory.values()) == [(0.5, "PASS"), (0.6, "FAIL")]
    half = targets["tensors <= 0.75x anchor, bf16 base", next(s for (n, s) in targets if n.startswith("tensors <="))]
    assert half["value"] == 0.5 and half["result"] == "PASS"


def test_a_bf16_row_without_its_bf16_anchor_gets_no_ratio():
    """A bf16 (or NF4) row is compared with the anchor in bf16 only: where that launch failed it gets no ratio and
    no anchor target, never the fp32 anchor's (a bf16 step against an fp32 one would pass for the dtype alone)."""
    configs = {
        "peft_accelerate_fsdp2": _launch(_rank(2.0, 1.0, 2 * GB, 1.0 * GB)),
        "peft_accelerate_fsdp2_bf16": {"error": "launch failed", "exit_code": 1},
        "lora_dist_fsdp2_bf16": _launch(_rank(1.0, 0.5, 1 * GB, 0.5 * GB)),
        "lora_dist_fsdp2": _launch(_rank(1.8, 1.0, 2 * GB, 0.9 * GB)),
    }
    summary = summarize(_results(configs))
    rows, targets = summary["sizes"][0]["rows"], _targets(summary)
    assert "x_anchor" not in rows["lora_dist_fsdp2_bf16"] and rows["lora_dist_fsdp2"]["x_anchor"]["step_s"] == 0.9
    assert ("step time <= 1.0x anchor", "lora_dist fsdp2, bf16 base") not in targets
    assert targets["step time <= 1.0x anchor", "lora_dist fsdp2"]["result"] == "PASS"
