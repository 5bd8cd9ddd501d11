"""From the ranks' raw results to the summary, the PASS/FAIL targets, ``results.md`` and plots.

Per configuration (the maximum over ranks unless said otherwise):

* peak RSS: anonymous resident memory of the train phase (``RssAnon``,
  sampled; shared libraries and memory-mapped files are left out); the
  kernel's exact high-water mark ``VmHWM``, which includes them, is in the JSON;
* peak tensors: live tensor bytes during one steady-state step (CPU) or
  ``max_memory_allocated`` over the train phase (CUDA);
* step time: the minimum over timed steps; tokens/s: global tokens per step
  over it; forward: the minimum of the timed no-grad forward passes;
* comm: bytes one rank sends per step under the ring model (:mod:`lora_dist.bench.measure`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

__all__ = ["failed_configs", "summarize", "write_all"]

GB = 1e9
MB = 1e6
ANCHOR = "peft_accelerate_fsdp2"
LABELS = {
    "lora_dist_fsdp2": "lora_dist fsdp2",
    "lora_dist_zero3": "lora_dist zero3",
    "lora_dist_ddp": "lora_dist ddp",
    "peft_accelerate_fsdp2": "PEFT + accelerate FSDP2 (anchor)",
    "peft_accelerate_zero3": "PEFT + accelerate ZeRO-3",
    "full_ft_fsdp2": "full fine-tuning, accelerate FSDP2",
    "lora_dist_auto": "lora_dist auto",
    "lora_dist_fsdp2_bf16": "lora_dist fsdp2, bf16 base",
    "lora_dist_auto_bf16": "lora_dist auto, bf16 base",
    "lora_dist_auto_compile": "lora_dist auto, compiled blocks",
    "lora_dist_auto_bf16_compile": "lora_dist auto, bf16 base, compiled blocks",
    "lora_dist_nf4": "lora_dist fsdp2, NF4 base",
    "lora_dist_nf4_all": "lora_dist fsdp2, NF4 base + embedding/head",
    "peft_accelerate_fsdp2_bf16": "PEFT + accelerate FSDP2, bf16 base (bf16 anchor)",
}
#: The anchor in bf16, for the configurations with a bf16 (or NF4) base.
ANCHOR_BF16 = "peft_accelerate_fsdp2_bf16"
#: Configurations compared with the bf16 anchor rather than the fp32 one.
NF4 = ("lora_dist_nf4", "lora_dist_nf4_all")
BF16 = ("lora_dist_fsdp2_bf16", "lora_dist_auto_bf16", "lora_dist_auto_bf16_compile", *NF4, ANCHOR_BF16)
SHARDED = ("lora_dist_fsdp2", "lora_dist_zero3")
EXPORT_LABELS = {
    "cli_fsdp2": "`lora-dist export RUN_DIR`, fsdp2 (own launch)",
    "cli_zero3": "`lora-dist export RUN_DIR`, zero3 (own launch)",
    "lora_dist_fsdp2": "lora_dist export_merged at the end of training, fsdp2",
    "lora_dist_zero3": "lora_dist export_merged at the end of training, zero3",
    ANCHOR: "anchor: full state dict to rank 0 + merge_and_unload + save_pretrained",
}
LORA_DIST = ("lora_dist_fsdp2", "lora_dist_zero3", "lora_dist_ddp", "lora_dist_auto", "lora_dist_fsdp2_bf16",
             "lora_dist_auto_bf16", "lora_dist_auto_compile", "lora_dist_auto_bf16_compile", *NF4)
EXPORT_SLACK = 0.10
PLAN_TOLERANCE = 0.15


def failed_configs(results: dict) -> list[str]:
    """Launches that did not produce results (configurations, exports, the offline merge)."""
    return [f"{s['name']}/{c}" for s in results["summary"]["sizes"] for c in s["failed"]]


def _per_step_max(ranks: list[dict], key: str, field: str) -> list[float]:
    series = [r[key].get(field, []) for r in ranks]
    return [max(values) for values in zip(*series)]


def _config_row(record: dict) -> dict | None:
    if "error" in record:
        return None
    ranks = record["ranks"]
    steps = _per_step_max(ranks, "train", "step_times")
    forwards = _per_step_max(ranks, "forward", "times")
    cpu_steps = _per_step_max(ranks, "train", "step_cpu_times")
    device_peak = [r["train"].get("peak_device_allocated") for r in ranks]
    tensor = ([r["instrumented_step"]["tensor_peak"] for r in ranks] if "tensor_peak" in ranks[0]["instrumented_step"]
              else device_peak)
    row = {
        "peak_rss": max(r["train"]["peak_anon"] for r in ranks),
        "peak_rss_hwm": max(r["train"]["peak_rss"] for r in ranks),
        "peak_tensor": max(tensor) if all(t is not None for t in tensor) else None,
        "baseline_rss": max(r["baseline"]["anon"] for r in ranks),
        "setup_s": max(r["setup"]["wall_s"] for r in ranks),
        "setup_peak_rss": max(r["setup"]["peak_anon"] for r in ranks),
        "step_s": min(steps),
        "step_median_s": statistics.median(steps),
        "step_times": steps,
        "forward_s": min(forwards),
        "step_cpu_s": min(cpu_steps) if cpu_steps else None,
        "tokens_per_s": ranks[0]["tokens_per_step"] / min(steps),
        "comm_bytes": max(r["instrumented_step"]["comm"]["wire_bytes"] for r in ranks),
        "comm_payload": max(r["instrumented_step"]["comm"]["payload_total"] for r in ranks),
        "comm_calls": ranks[0]["instrumented_step"]["comm"]["calls"],
        "trainable_params": ranks[0]["params"]["trainable"],
        "base_bytes": max(r.get("base_bytes", 0) for r in ranks) or None,
        # the planner's gathered or dequantized base copies alive at the step's peak, and that moment
        "peak_base_copies": (ranks[0].get("plan") or {}).get("gathered"),
        "peak_at": (ranks[0].get("plan") or {}).get("peak_at"),
        "reproduced": any(r["reproduced"] for r in ranks),
        "notes": ranks[0]["notes"],
        "loadavg": [record["loadavg_before"], record["loadavg_after"]],
        "self_times": record.get("self_times"),
    }
    row["step_over_forward"] = row["step_s"] / row["forward_s"]
    if "export" in ranks[0]:
        row["export"] = {
            "wall_s": max(r["export"]["wall_s"] for r in ranks),
            "peak_rss_per_rank": [r["export"]["peak_anon"] for r in ranks],
            "above_baseline_per_rank": [r["export"]["peak_anon"] - r["baseline"]["anon"] for r in ranks],
            "peak_tensor_per_rank": [r["export"].get("tensor_peak") or r["export"].get("peak_device_allocated")
                                     for r in ranks],
            "own_tensor_per_rank": [r["export"]["tensor_peak"] - r["export"]["tensor_start"]
                                    if "tensor_peak" in r["export"] else None for r in ranks],
        }
    return row


def _export_cli_row(record: dict) -> dict | None:
    """``lora-dist export RUN_DIR`` launch: the export_merged phase, and the whole command (load + export)."""
    if "error" in record:
        return None
    ranks = record["ranks"]
    return {
        "wall_s": max(r["export"]["wall_s"] for r in ranks),
        "peak_rss_per_rank": [r["export"]["peak_anon"] for r in ranks],
        "above_baseline_per_rank": [r["export"]["peak_anon"] - r["baseline"]["anon"] for r in ranks],
        "peak_tensor_per_rank": [r["export"].get("tensor_peak") or r["export"].get("peak_device_allocated")
                                 for r in ranks],
        "own_tensor_per_rank": [r["export"]["tensor_peak"] - r["export"]["tensor_start"]
                                if "tensor_peak" in r["export"] else None for r in ranks],
        "command_above_baseline_per_rank": [r["command"]["peak_anon"] - r["baseline"]["anon"] for r in ranks],
        "command_wall_s": max(r["command"]["wall_s"] for r in ranks),
    }


def _target(kind: str, size: str, subject: str, value: float | None, limit: float, detail: str) -> dict:
    return {"target": kind, "size": size, "subject": subject, "value": value, "limit": limit,
            "result": "n/a" if value is None else ("PASS" if value <= limit else "FAIL"), "detail": detail}


def summarize(results: dict) -> dict:
    """Rows per size and configuration, ratios to the anchor, and the targets."""
    sizes, targets = [], []
    world = results["options"]["nproc"]
    for size in results["sizes"]:
        name = size["spec"]["name"]
        rows = {c: _config_row(r) for c, r in size["configs"].items()}
        anchor, anchor_bf16 = rows.get(ANCHOR), rows.get(ANCHOR_BF16)
        for c, row in rows.items():
            if row is None:
                continue
            row["anchor"] = ANCHOR_BF16 if c in BF16 else ANCHOR  # no ratio where it failed: never the other dtype's
            reference = rows.get(row["anchor"])
            if reference:
                row["x_anchor"] = {
                    "peak_rss": row["peak_rss"] / reference["peak_rss"],
                    "peak_tensor": (row["peak_tensor"] / reference["peak_tensor"]
                                    if row["peak_tensor"] and reference["peak_tensor"] else None),
                    "step_s": row["step_s"] / reference["step_s"],
                    "step_cpu_s": (row["step_cpu_s"] / reference["step_cpu_s"]
                                   if row.get("step_cpu_s") and reference.get("step_cpu_s") else None),
                    "tokens_per_s": row["tokens_per_s"] / reference["tokens_per_s"],
                    "comm_bytes": row["comm_bytes"] / reference["comm_bytes"] if reference["comm_bytes"] else None,
                }
        plans = {**size.get("plans", {}), **{c: r["ranks"][0]["plan"] for c, r in size["configs"].items()
                                             if "error" not in r and "plan" in r["ranks"][0]}}
        model_bytes = plans.get("lora_dist_fsdp2", {}).get("model_bytes")
        largest = plans.get("lora_dist_fsdp2", {}).get("largest_tensor_bytes")
        budget = (model_bytes / world + largest) * (1 + EXPORT_SLACK) if model_bytes else None
        ddp = rows.get("lora_dist_ddp")
        for c in SHARDED:
            row = rows.get(c)
            if not row:
                continue
            for metric, label in (("peak_rss", "RSS"), ("peak_tensor", "tensors")):
                if ddp and row[metric] and ddp[metric]:
                    targets.append(_target("train peak <= 0.6x DDP", name, f"{LABELS[c]} ({label})",
                                           row[metric] / ddp[metric], 0.6,
                                           f"{row[metric] / GB:.2f} GB vs DDP {ddp[metric] / GB:.2f} GB"))
                if anchor and row[metric] and anchor[metric]:
                    targets.append(_target("train peak <= anchor", name, f"{LABELS[c]} ({label})",
                                           row[metric] / anchor[metric], 1.0,
                                           f"{row[metric] / GB:.2f} GB vs {anchor[metric] / GB:.2f} GB"))
        for c in LORA_DIST:
            row = rows.get(c)
            if not row:
                continue
            reference = rows.get(row["anchor"])
            if reference:
                cpu = row["x_anchor"].get("step_cpu_s")
                targets.append(_target("step time <= 1.0x anchor", name, LABELS[c],
                                       row["step_s"] / reference["step_s"], 1.0,
                                       f"{row['step_s']:.2f} s vs {reference['step_s']:.2f} s"
                                       + (" (bf16 anchor)" if row["anchor"] == ANCHOR_BF16 else "")
                                       + (f"; CPU time per step {cpu:.2f}x" if cpu else "")))
            targets.append(_target("LoRA step <= 2.3x forward", name, LABELS[c], row["step_over_forward"], 2.3,
                                   f"step {row['step_s']:.2f} s, forward {row['forward_s']:.2f} s"))
        targets += _frozen_base_targets(name, rows, anchor, anchor_bf16)
        full = rows.get("full_ft_fsdp2")
        if full:
            targets.append({"target": "LoRA step <= 2.3x forward", "size": name, "subject": LABELS["full_ft_fsdp2"],
                            "value": full["step_over_forward"], "limit": None, "result": "reference",
                            "detail": "full fine-tuning, for comparison (about 3x expected)"})
        exports = {}
        for c in ("lora_dist_fsdp2", "lora_dist_zero3", ANCHOR):
            row = rows.get(c)
            if row and "export" in row:
                exports[c] = row["export"]
        for strategy, record in size.get("export_cli", {}).items():
            row = _export_cli_row(record)
            if row:
                exports[f"cli_{strategy}"] = row
        for key, e in exports.items():
            if key == ANCHOR or not budget:
                continue
            subject = EXPORT_LABELS[key]
            targets.append(_target("export peak <= model/W + largest + 10%", name, f"{subject} (RSS)",
                                   max(e["above_baseline_per_rank"]) / budget, 1.0,
                                   f"{max(e['above_baseline_per_rank']) / GB:.3f} GB above the pre-model baseline "
                                   f"vs budget {budget / GB:.3f} GB"))
            if all(t is not None for t in e["peak_tensor_per_rank"]):
                own = [t for t in e["own_tensor_per_rank"] if t is not None]
                targets.append(_target("export peak <= model/W + largest + 10%", name, f"{subject} (tensors)",
                                       max(e["peak_tensor_per_rank"]) / budget, 1.0,
                                       f"{max(e['peak_tensor_per_rank']) / GB:.3f} GB vs budget {budget / GB:.3f} GB"
                                       + (f"; the export's own share {max(own) / GB:.3f} GB, largest tensor "
                                          f"{largest / GB:.3f} GB" if own else "")))
        merge = size.get("merge", {})
        if "merge_s" in merge and "error" not in merge:
            targets.append(_target("offline merge <= 3x plain copy", name, "lora-dist merge",
                                   merge["merge_s"] / merge["copy_floor_s"], 3.0,
                                   f"{merge['merge_s']:.2f} s vs copy {merge['copy_floor_s']:.2f} s "
                                   f"({merge['weight_bytes'] / GB:.2f} GB)"))
        plan_rows = []
        for c in LORA_DIST:
            row, plan = rows.get(c), plans.get(c)
            if row and plan and row["peak_tensor"]:
                error = plan["total"] / row["peak_tensor"] - 1
                plan_rows.append({"config": c, "predicted": plan["total"], "measured": row["peak_tensor"],
                                  "error": error, "terms": {t: plan[t] for t in (
                                      "base_shard", "base_replicated", "lora_params", "lora_grads", "optimizer_state",
                                      "activations", "gathered", "buffers")}})
                targets.append(_target("planner within 15%", name, LABELS[c], abs(error), PLAN_TOLERANCE,
                                       f"predicted {plan['total'] / GB:.3f} GB, measured {row['peak_tensor'] / GB:.3f} "
                                       f"GB ({error:+.1%})"))
        sizes.append({"name": name, "num_params": size["num_params"], "rows": rows, "exports": exports,
                      "export_budget": budget, "merge": merge, "plans": plan_rows,
                      "failed": {**{c: r["error"] for c, r in size["configs"].items() if "error" in r},
                                 **{f"lora-dist export ({k})": r["error"]
                                    for k, r in size.get("export_cli", {}).items() if "error" in r},
                                 **({"lora-dist merge": merge["error"]} if "error" in merge else {})}})
    return {"sizes": sizes, "targets": targets}


def _frozen_base_targets(size: str, rows: dict, anchor: dict | None, anchor_bf16: dict | None) -> list[dict]:
    """What the frozen base is worth: lora_dist with a bf16 base against the anchor with one (tensors per rank), the
    NF4 base's bytes against the bf16 base's, and ``auto``'s step against the anchor's in the same dtype (fp32, and
    with a bf16 base)."""
    out = []
    bf16 = rows.get("lora_dist_fsdp2_bf16")
    if bf16 and anchor_bf16 and bf16["peak_tensor"] and anchor_bf16["peak_tensor"]:
        out.append(_target("tensors <= 0.75x anchor, bf16 base", size, LABELS["lora_dist_fsdp2_bf16"],
                           bf16["peak_tensor"] / anchor_bf16["peak_tensor"], 0.75,
                           f"{bf16['peak_tensor'] / GB:.3f} GB vs bf16 anchor {anchor_bf16['peak_tensor'] / GB:.3f} GB"))
    for name in NF4:  # the NF4 targets on both NF4 rows: blocks only, and embedding/head too
        nf4 = rows.get(name)
        if nf4 and bf16 and nf4["base_bytes"] and bf16["base_bytes"]:
            out.append(_target("NF4 stored base bytes <= 0.3x bf16 base", size, LABELS[name],
                               nf4["base_bytes"] / bf16["base_bytes"], 0.3,
                               f"{nf4['base_bytes'] / MB:.1f} MB vs {bf16['base_bytes'] / MB:.1f} MB per rank"))
            copies = nf4.get("peak_base_copies"), bf16.get("peak_base_copies")
            if None not in copies:  # the stored shards (measured) + the base's copies at the peak (planned)
                live = nf4["base_bytes"] + copies[0], bf16["base_bytes"] + copies[1]
                out.append(_target("NF4 base bytes at the step's peak <= 0.3x bf16 base", size, LABELS[name],
                                   live[0] / live[1], 0.3,
                                   f"{live[0] / MB:.1f} MB vs {live[1] / MB:.1f} MB per rank: stored (measured) + "
                                   f"{copies[0] / MB:.1f} MB vs {copies[1] / MB:.1f} MB of gathered or dequantized "
                                   f"base copies at the peak (planned, at {nf4.get('peak_at') or 'its peak'} vs "
                                   f"{bf16.get('peak_at') or 'its peak'})"))
        if nf4 and anchor_bf16 and nf4["peak_tensor"] and anchor_bf16["peak_tensor"]:
            out.append(_target("NF4 tensors <= 0.55x anchor", size, LABELS[name],
                               nf4["peak_tensor"] / anchor_bf16["peak_tensor"], 0.55,
                               f"{nf4['peak_tensor'] / GB:.3f} GB vs bf16 anchor {anchor_bf16['peak_tensor'] / GB:.3f} GB"))
    for name in (c for c in LORA_DIST if c.startswith("lora_dist_auto")):  # against the anchor of its dtype
        against, which = (anchor_bf16, "bf16 anchor") if name in BF16 else (anchor, "anchor")
        auto = rows.get(name)
        if auto and against:
            chose = next((n for n in auto["notes"] if n.startswith("auto chose")), "")
            floor = ""
            if auto.get("self_times") and against.get("self_times"):  # --profile on a CPU
                own, theirs = auto["self_times"], against["self_times"]
                ratio = (own["matmul"] + own["attention"]) / theirs["total"]
                floor = f"; its matmuls + attention alone are {ratio:.2f}x the {which}'s profiled step"
            out.append(_target("auto step <= 0.5x anchor (DDP fits)", size, LABELS[name],
                               auto["step_s"] / against["step_s"], 0.5,
                               f"{auto['step_s']:.2f} s vs {which} {against['step_s']:.2f} s; {chose}{floor}"))
    return out


# ----------------------------------------------------------------------------- markdown


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _gb(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value / GB:.{digits}f}"


def _machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cpu_model']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM{gpu}; {m['os']}; Python "
            f"{m['python']}, torch {m['torch']}, transformers {m['transformers']}, PEFT {m['peft']}, accelerate "
            f"{m['accelerate']}, DeepSpeed {m['deepspeed']}")


def markdown(results: dict, summary: dict) -> str:
    o = results["options"]
    tokens = o["nproc"] * o["micro_batch"] * o["seq_len"]
    lines = [
        "# lora_dist benchmark",
        "",
        f"Machine: {_machine_line(results['machine'])}.",
        "",
        f"Code: commit {results.get('source', {}).get('commit', '?')}"
        + (" with local changes to " + ", ".join(l.split()[-1] for l in results["source"]["modified"])
           if results.get("source", {}).get("modified") else "")
        + (". **The sources changed while the benchmark ran: these results mix versions.**"
           if results.get("source_changed_during_run") else "."),
        "",
        f"Every configuration: {o['nproc']} ranks ("
        + ("one `torchrun` launch each" if o.get("launcher", "torchrun") == "torchrun" else
           "forked from the benchmark's process, which imported their libraries once (`--launcher fork`)")
        + ", run one after another, "
        f"`OMP_NUM_THREADS=1`), the same data, {o['micro_batch']} x {o['seq_len']} tokens per rank per step "
        f"({tokens} per step), fp32 (the bf16 and NF4 rows: a bf16 base, fp32 LoRA), LoRA r={o['lora_r']} alpha={2 * o['lora_r']} on every linear layer but the "
        f"output head, AdamW, gradient clipping 1.0; {o['warmup_steps']} warm-up step and one more (the training "
        f"RSS peak, sampled), then {o['timed_steps']} timed steps (not sampled), {o['forward_reps']} timed forward passes. Started {results['started']}, took "
        f"{results['total_wall_s'] / 60:.1f} min{' (--quick)' if o['quick'] else ''}.",
        "",
        *(["**--quick smoke run**: a 1M-parameter model, where fixed costs dominate; the numbers check that "
            "everything runs, they say nothing about the methods.", ""] if o["quick"] else []),
        *(["Profiles (`--profile`): one more step of each configuration under `torch.profiler`, after the timed "
           "ones, rank 0's operators by self time: `profiles/SIZE-CONFIG.txt`. On a CPU the `auto` targets also say "
           "what `auto`'s matmuls and attention alone take against the anchor's profiled step: the ratio `auto` "
           "would have with nothing else in its step.", ""] if o.get("profile") else []),
        "Per rank. *x anchor* is the ratio to PEFT + accelerate FSDP2 measured in the same run (for the rows with "
        "a bf16 or NF4 base: to that anchor with a bf16 base). RSS: peak "
        "anonymous resident memory of the training phase (libraries and memory-mapped files excluded); "
        "tensors: peak live tensor bytes in a steady-state step; step: fastest timed step (wall); CPU s/step: the "
        "rank's CPU time (all threads) in its least busy timed step, less sensitive to other work on the machine; "
        "comm: bytes a rank sends per step (ring model); step/fwd: step time over one forward pass of the same model.",
    ]
    for s in summary["sizes"]:
        lines += ["", f"## Training: {s['name']} ({s['num_params'] / 1e6:.0f}M parameters)", "",
                  "| configuration | RSS GB | x anchor | tensors GB | x anchor | step s | x anchor | CPU s/step | "
                  "x anchor | tokens/s | x anchor | comm MB/step | x anchor | step/fwd |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c, row in s["rows"].items():
            label = LABELS.get(c, c) + (" \\*" if row and row["reproduced"] else "")
            ran_as = [n for n in (row or {}).get("notes", []) if n.startswith("fsdp2 over one shard rank")]
            label += f" ({ran_as[0]})" if ran_as else ""
            if row is None:
                lines.append(f"| {label} | failed: see results.json | | | | | | | | | | | | |")
                continue
            x = row.get("x_anchor", {})
            cpu = "n/a" if row.get("step_cpu_s") is None else f"{row['step_cpu_s']:.2f}"
            lines.append(
                f"| {label} | {_gb(row['peak_rss'])} | {_x(x.get('peak_rss'))} | {_gb(row['peak_tensor'])} | "
                f"{_x(x.get('peak_tensor'))} | {row['step_s']:.2f} | {_x(x.get('step_s'))} | {cpu} | "
                f"{_x(x.get('step_cpu_s'))} | {row['tokens_per_s']:.0f} | {_x(x.get('tokens_per_s'))} | "
                f"{row['comm_bytes'] / MB:.1f} | {_x(x.get('comm_bytes'))} | {row['step_over_forward']:.2f} |")
    if not results["machine"].get("gpu"):
        lines += ["", "\\* accelerate enables FSDP only on accelerator devices; on this CPU machine its FSDP state was "
                  "set as its GPU branch sets it and accelerate's own `prepare`/`fsdp2_prepare_model` ran "
                  "(see `bench/systems.py`)."]
    lines += ["", "## Merged export and offline merge", ""]
    if not any(s["exports"] or "merge_s" in s["merge"] or "error" in s["merge"] for s in summary["sizes"]):
        lines.append("None measured: the exports and the merge start from lora_dist_fsdp2's adapter, which this "
                     "run did not train.")
    else:
        lines += [
            "Peak memory per rank above the process's baseline before the model was loaded (anonymous RSS, and "
            "live tensors), max over ranks. *own*: the export's increase over what the process held when it "
            "started (tensors). At the end of training the export follows `Engine.finish_training()` (optimizer "
            "state and gradients freed, gathered weights resharded), as in `lora-dist train`; what remains above "
            "the base shard is the replicated LoRA state and, under zero3, DeepSpeed's buffers. "
            "Budget: model/W + largest tensor + 10%.", "",
            "| size | method | wall s | RSS above baseline GB | tensors GB | own GB | budget GB |",
            "|---|---|---:|---:|---:|---:|---:|"]
        for s in summary["sizes"]:
            for key in ("cli_fsdp2", "cli_zero3", "lora_dist_fsdp2", "lora_dist_zero3", ANCHOR):
                e = s["exports"].get(key)
                if e is None:
                    continue
                tensors = [t for t in e["peak_tensor_per_rank"] if t is not None]
                own = [t for t in e["own_tensor_per_rank"] if t is not None]
                lines.append(f"| {s['name']} | {EXPORT_LABELS[key]} | {e['wall_s']:.2f} | "
                             f"{_gb(max(e['above_baseline_per_rank']), 3)} | {_gb(max(tensors), 3) if tensors else 'n/a'} | "
                             f"{_gb(max(own), 3) if own else 'n/a'} | {_gb(s['export_budget'], 3)} |")
            m = s["merge"]
            if "merge_s" in m:
                lines.append(f"| {s['name']} | `lora-dist merge` (offline, 1 process) | {m['merge_s']:.2f} | "
                             f"{_gb(m['merge_above_baseline'], 3)} | | | |")
                lines.append(f"| {s['name']} | plain copy of the same {m['weight_bytes'] / GB:.2f} GB (read, write, fsync)"
                             f" | {m['copy_floor_s']:.2f} | | | | |")
            for key in ("cli_fsdp2", "cli_zero3"):
                e = s["exports"].get(key)
                if e:
                    lines.append(f"| {s['name']} | whole `lora-dist export` command, {key[4:]} (load + export) | "
                                 f"{e['command_wall_s']:.2f} | {_gb(max(e['command_above_baseline_per_rank']), 3)} | | | |")
    lines += ["", "## Targets", "", "| target | size | subject | measured | limit | result | detail |",
              "|---|---|---|---:|---:|---|---|"]
    for t in summary["targets"]:
        value = "" if t["value"] is None else f"{t['value']:.2f}"
        limit = "" if t["limit"] is None else f"{t['limit']:.2f}"
        lines.append(f"| {t['target']} | {t['size']} | {t['subject']} | {value} | {limit} | **{t['result']}** | "
                     f"{t['detail']} |")
    lines += ["", "## Planner (`lora-dist plan`) against the measured peak tensors", "",
              "| size | configuration | predicted GB | measured GB | error | terms (GB) |", "|---|---|---:|---:|---:|---|"]
    for s in summary["sizes"]:
        for p in s["plans"]:
            terms = ", ".join(f"{k} {v / GB:.3f}" for k, v in p["terms"].items() if v)
            lines.append(f"| {s['name']} | {LABELS[p['config']]} | {_gb(p['predicted'], 3)} | "
                         f"{_gb(p['measured'], 3)} | {p['error']:+.1%} | {terms} |")
    failed = [(s["name"], c, e) for s in summary["sizes"] for c, e in s["failed"].items()]
    if failed:
        lines += ["", "## Failed launches", ""]
        for size, c, e in failed:
            lines += [f"- {size} {c}:", "", "```", e[-1500:], "```"]
    loads = [(s["name"], c, r["loadavg"]) for s in summary["sizes"] for c, r in s["rows"].items() if r]
    if loads:
        worst = max(l[2][1][0] for l in loads if l[2][1])
        lines += ["", f"Load average (1 min) after launches ranged up to {worst:.1f} on {results['machine']['cpu_cores']}"
                  " cores; other work on the machine slows steps, which is why step times are the fastest timed step. "
                  "Per-launch load averages are in results.json."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def plots(results: dict, summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = summary["sizes"]
    xs = [s["num_params"] / 1e6 for s in sizes]
    configs = [c for c in LABELS if any(s["rows"].get(c) for s in sizes)]
    written = []

    def series(key, scale=1.0, sub=None):
        out_ = {}
        for c in configs:
            vals = []
            for s in sizes:
                row = s["rows"].get(c)
                v = None if not row else (row[key] if sub is None else row[key].get(sub))
                vals.append(None if v is None else v / scale)
            out_[c] = vals
        return out_

    # one colour per configuration (the default cycle has 10 for up to 14), lora_dist's solid and the others dashed
    palette = plt.get_cmap("tab20")
    style = {c: {"color": palette(i % 20), "marker": "os^Dv<>pP*hXd8"[i % 14],
                 "linestyle": "-" if c.startswith("lora_dist") else "--"} for i, c in enumerate(LABELS)}

    def line_plot(ax, data, ylabel, title):
        for c, vals in data.items():
            pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
            if pts:
                ax.plot(*zip(*pts), label=LABELS[c], **style[c])
        ax.set_xlabel("model parameters (M)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    def line_figure(name: str, panels: list[tuple], legend_on: int) -> None:
        """Two line plots side by side, ``(data, ylabel, title)`` each; the legend on panel ``legend_on``."""
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, panel in zip(axes, panels):
            line_plot(ax, *panel)
        axes[legend_on].legend(fontsize=8)
        save(fig, name)

    line_figure("memory.png", [(series("peak_rss", GB), "GB per rank", "Peak RSS (anonymous) while training"),
                               (series("peak_tensor", GB), "GB per rank", "Peak live tensor bytes in a step")], 1)
    line_figure("speed_comm.png", [(series("step_s"), "seconds", "Step time (fastest timed step)"),
                                   (series("comm_bytes", MB), "MB sent per rank per step", "Communication per step")], 0)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = [("cli_fsdp2", "lora-dist export, fsdp2"), ("cli_zero3", "lora-dist export, zero3"),
               ("lora_dist_fsdp2", "end of training, fsdp2"), ("lora_dist_zero3", "end of training, zero3"),
               (ANCHOR, "anchor (gather to rank 0)")]
    width = 0.8 / (len(methods) + 2)
    for i, (c, label) in enumerate(methods):
        walls = [s["exports"][c]["wall_s"] if c in s["exports"] else 0 for s in sizes]
        mems = [max(s["exports"][c]["above_baseline_per_rank"]) / GB if c in s["exports"] else 0 for s in sizes]
        pos = [k + i * width for k in range(len(sizes))]
        axes[0].bar(pos, walls, width, label=label)
        axes[1].bar(pos, mems, width, label=label)
    merges = [s["merge"].get("merge_s", 0) for s in sizes]
    copies = [s["merge"].get("copy_floor_s", 0) for s in sizes]
    axes[0].bar([k + len(methods) * width for k in range(len(sizes))], merges, width, label="lora-dist merge (offline)")
    axes[0].bar([k + (len(methods) + 1) * width for k in range(len(sizes))], copies, width, label="plain copy")
    budgets = [(s["export_budget"] or 0) / GB for s in sizes]
    for k, b in enumerate(budgets):
        axes[1].hlines(b, k - width / 2, k + len(methods) * width, colors="k", linestyles="dashed",
                       label="budget: model/W + largest + 10%" if k == 0 else None)
    for ax, title, ylabel in ((axes[0], "Merged export: wall time", "seconds"),
                              (axes[1], "Merged export: peak per rank above baseline", "GB")):
        ax.set_xticks([k + width * 2 for k in range(len(sizes))], [s["name"] for s in sizes])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    save(fig, "export.png")
    return written


def write_all(results: dict, out: Path) -> dict:
    """``results.json`` (raw + summary), ``results.md`` and the PNGs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    results["summary"] = summary
    results["plots"] = [p.name for p in plots(results, summary, out)]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results, summary))
    return summary
