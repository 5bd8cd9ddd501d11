"""``python -m bench checkpointing``: what checkpointing every Nth block costs and saves, against none and every block.

One process (``parallel.strategy=none``), one model and one batch for every setting of
``parallel.activation_checkpointing`` (false, every 4th block, every 2nd, true): the blocks' checkpointing switches
are flipped between steps (:func:`lora_dist.parallel.checkpointing.checkpointed_blocks`), and the settings take
turns, round after round, so that the host's drift hits each alike. Each step is the training loop's own (the
engine's forward, loss, backward and AdamW step). Per setting: the median step time of the rounds after the first
(warm-up), the peak live tensor bytes of one more step (as ``lora-dist bench`` measures them), and the planner's
prediction of that peak. Results: ``bench/results/checkpointing.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

__all__ = ["main", "run"]

SETTINGS = (False, 4, 2, True)


def run(size: str, tokens: int, rounds: int, out: Path, work_dir: Path) -> dict:
    import torch
    import torch.distributed as dist

    from lora_dist.bench.measure import LiveTensorBytes, machine_info
    from lora_dist.bench.models import FULL_SIZES, QUICK_SIZES, build_checkpoint
    from lora_dist.blocks import find_blocks
    from lora_dist.config import load_config
    from lora_dist.launch import destroy_distributed
    from lora_dist.parallel.checkpointing import checkpoint_blocks, checkpointed_blocks
    from lora_dist.plan import plan_memory
    from lora_dist.session import prepare

    spec = next((s for s in (*FULL_SIZES, *QUICK_SIZES) if s.name == size), None)
    if spec is None:
        raise SystemExit(f"unknown --size {size}; choose one of {[s.name for s in (*FULL_SIZES, *QUICK_SIZES)]}")
    path = build_checkpoint(spec, work_dir / "models")
    seq = min(tokens, 512)
    overrides = [f"model.path={path}", "parallel.strategy=none", f"train.seq_len={seq}",
                 f"train.micro_batch_size={tokens // seq}"]
    # The model and engine as lora-dist train builds them, every block checkpointed; the switches flipped below.
    started = dist.is_initialized()
    model, engine = prepare(load_config(None, [*overrides, "parallel.activation_checkpointing=true"]))
    try:
        blocks = find_blocks(model)
        ids = torch.randint(0, spec.vocab, (tokens // seq, seq), generator=torch.Generator().manual_seed(0))

        def step() -> None:
            engine.backward(engine.forward_loss_sum({"input_ids": ids}, ids))
            engine.step(1e-5)

        times: dict = {s: [] for s in SETTINGS}
        for turn in range(rounds):
            for setting in SETTINGS:
                checkpoint_blocks(blocks, setting)
                t0 = time.perf_counter()
                step()
                if turn:  # the first round warms up
                    times[setting].append(time.perf_counter() - t0)
        rows = []
        none = statistics.median(times[False])
        for setting in SETTINGS:
            checkpoint_blocks(blocks, setting)
            tracker = LiveTensorBytes("cpu")
            with tracker:
                step()
            setting_cfg = load_config(None, [*overrides, f"parallel.activation_checkpointing={str(setting).lower()}"])
            plan = plan_memory(setting_cfg, 1)
            median = statistics.median(times[setting])
            rows.append({"activation_checkpointing": setting, "mode": plan.mode,
                         "checkpointed_blocks": len(checkpointed_blocks(len(blocks), setting)), "blocks": len(blocks),
                         "step_s": median, "step_s_each": times[setting], "x_none": median / none,
                         "peak_tensor_bytes": tracker.peak, "planned_bytes": plan.total,
                         "planned_x_measured": plan.total / tracker.peak})
    finally:
        if not started:  # prepare() started it for this measurement (a caller's stays): its groups and variables
            destroy_distributed()
    result = {"machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "size": size,
              "tokens": tokens, "rounds": rounds, "threads": torch.get_num_threads(), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict) -> str:
    lines = [f"{result['size']}, {result['tokens']} tokens, one process, {result['threads']} threads, "
             f"median of {result['rounds'] - 1} rounds",
             "| activation checkpointing | blocks recomputed | step s | x none | live tensors GB | planned GB |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['activation_checkpointing']} | {row['checkpointed_blocks']}/{row['blocks']} | "
                     f"{row['step_s']:.2f} | {row['x_none']:.3f}x | {row['peak_tensor_bytes'] / 1e9:.3f} | "
                     f"{row['planned_bytes'] / 1e9:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench checkpointing", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="llama-112m", help="a benchmark model size (default %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (default %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of every setting, the first a warm-up (default 4)")
    p.add_argument("--out", default="bench/results/checkpointing.json", help="result file (default %(default)s)")
    p.add_argument("--work-dir", default="/tmp/lora_dist_bench", help="where the model is built (default %(default)s)")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2: the first warms up")
    print(table(run(args.size, args.tokens, args.rounds, Path(args.out), Path(args.work_dir))))
    return 0
