"""``python -m bench accuracy``: what storing the frozen base in bf16 or NF4 costs in accuracy, on a trained model.

No trained checkpoint is on this project's machines, and a randomly initialized one tells nothing (its
loss is log(vocab) whatever its weights hold). So the study trains one first, then asks what a user
asks of ``model.dtype`` and ``model.quantize``:

1. **Pretrain** a small Llama (4 blocks, width 256, the demo tokenizer's 489 tokens in a 512-row
   embedding, untied head) from scratch on the demo's templated sentences ("the red fox likes wooden boats
   in the morning."), full-parameter AdamW in fp32, and save it with ``save_pretrained``.
2. For each storage of that base - fp32, bf16, NF4 blocks (``model.quantize=nf4``), NF4 blocks and the
   embedding and head (``model.quantize_embeddings=true``) - with lora_dist's own ``evaluate_run`` and
   ``train``:

   * the **base's** eval loss on held-out sentences of the pretraining kind: the direct cost of the
     storage;
   * a **LoRA fine-tune** (r=16, every linear) to a task the base never saw: the same sentences in another
     order ("in the morning, the red fox likes wooden boats."), and its eval loss on held-out records of
     that task: what the storage costs after fine-tuning (QLoRA's claim is that LoRA recovers it).

Every storage trains from the same data, seeds and schedule, on one process, so what differs is the
base. The study is small (3.3M parameters, synthetic grammar): it measures the mechanism on learned
weights, not what a 70B model loses. Results: ``bench/results/accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

__all__ = ["MODES", "main", "run"]

#: The storages compared: name -> model overrides.
MODES = {
    "fp32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "nf4": ["model.dtype=bfloat16", "model.quantize=nf4"],
    "nf4_embeddings": ["model.dtype=bfloat16", "model.quantize=nf4", "model.quantize_embeddings=true"],
}

#: The pretrained model's shape (every block linear holds whole 16,384-element NF4 groups).
SHAPE = dict(arch="llama", hidden=256, layers=4, heads=4, intermediate=768, max_pos=256, vocab=512)


def _sentences(n: int, seed: int, reorder: bool) -> list[str]:
    """Records of 2-4 demo sentences; ``reorder`` puts each sentence's place first (the fine-tuning task)."""
    from lora_dist.demo import _OBJECTS, _PLACES, _SUBJECTS, _VERBS

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(2, 4)):
            s, v, o, p = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES))
            parts.append(f"{p}, {s} {v} {o}." if reorder else f"{s} {v} {o} {p}.")
        out.append(" ".join(x[0].upper() + x[1:] for x in parts))
    return out


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def pretrain(path: Path, steps: int, seed: int = 0, shape: dict | None = None) -> dict:
    """Train the small Llama (``shape``, default :data:`SHAPE`) from scratch on the pretraining sentences (plain
    torch, fp32); save it at ``path``."""
    import torch
    import transformers as tf

    from lora_dist.demo import make_tiny_checkpoint

    make_tiny_checkpoint(path, seed=seed, **(shape or SHAPE))
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = [t for text in _sentences(4000, seed, reorder=False) for t in tokenizer(text)["input_ids"]
           + [tokenizer.eos_token_id]]
    seq, batch = 128, 16
    blocks = torch.tensor(ids[:len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps))))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        x = blocks[torch.randint(0, len(blocks), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(path)
    return {"steps": steps, "tokens_per_step": batch * seq, "first_loss": losses[0],
            "final_loss": sum(losses[-10:]) / 10, "params": sum(p.numel() for p in model.parameters())}


def _config(model: Path, data: Path, eval_data: Path, out: Path, mode: str, steps: int, seed: int = 0,
            micro_batch: int = 8):
    from lora_dist.config import config_from_dict

    raw = {
        "model": {"path": str(model)},
        "data": {"path": str(data), "eval_path": str(eval_data)},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "parallel": {"strategy": "ddp"},
        "train": {"steps": steps, "micro_batch_size": micro_batch, "lr": 2e-3, "warmup_steps": 10, "seq_len": 128,
                  "eval_batches": 1, "log_every": 10, "seed": seed},
        "checkpoint": {"every": 0},
        "export": {"adapter": True, "merged": False},
        "output": {"dir": str(out), "overwrite": True},
        "tracking": {"tensorboard": False},
    }
    return config_from_dict(raw, MODES[mode])


def run(work: Path, pretrain_steps: int, finetune_steps: int, seeds: int = 2, modes: list[str] | None = None,
        micro_batch: int = 8, shape: dict | None = None) -> dict:
    """The whole study under ``work``, fine-tuning on ``micro_batch`` blocks of 128 tokens a step, of a model of
    ``shape`` (default :data:`SHAPE`); returns the results (also printed as it goes)."""
    import torch.distributed as dist

    from lora_dist.launch import destroy_distributed

    owned = not dist.is_initialized()  # train() and evaluate_run() leave their one-process group to the caller
    try:
        return _study(work, pretrain_steps, finetune_steps, seeds, modes, micro_batch, shape or SHAPE)
    finally:
        if owned:
            destroy_distributed()


def _study(work: Path, pretrain_steps: int, finetune_steps: int, seeds: int, modes: list[str] | None,
           micro_batch: int, shape: dict) -> dict:
    import torch

    from lora_dist.evaluation import evaluate_run
    from lora_dist.train import train

    work.mkdir(parents=True, exist_ok=True)
    model = work / "pretrained"
    stamp = model / "pretrain.json"  # the pretrained model is kept for reruns with the same steps
    kept = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if kept.get("steps") == pretrain_steps and kept.get("shape") == shape:
        pre = kept
    else:
        t0 = time.perf_counter()
        pre = {**pretrain(model, pretrain_steps, shape=shape), "shape": shape}
        pre["seconds"] = time.perf_counter() - t0
        stamp.write_text(json.dumps(pre))
    print(f"pretrained {pre['params'] / 1e6:.1f}M params, {pretrain_steps} steps: loss {pre['first_loss']:.3f} -> "
          f"{pre['final_loss']:.3f} ({pre['seconds']:.0f} s)", flush=True)
    pre_eval = _write(work / "pretrain_eval.jsonl", _sentences(200, 101, reorder=False))
    task = _write(work / "task_train.jsonl", _sentences(2000, 102, reorder=True))
    task_eval = _write(work / "task_eval.jsonl", _sentences(200, 103, reorder=True))

    rows = {}
    for mode in modes or list(MODES):
        out = work / "runs" / mode
        cfg = _config(model, task, pre_eval, out, mode, finetune_steps, micro_batch=micro_batch)
        base_pre = evaluate_run(cfg, base_only=True).loss
        cfg = _config(model, task, task_eval, out, mode, finetune_steps, micro_batch=micro_batch)
        base_task = evaluate_run(cfg, base_only=True).loss
        tuned, first, final = [], [], []
        for seed in range(seeds):
            cfg = _config(model, task, task_eval, out, mode, finetune_steps, seed, micro_batch)
            result = train(cfg)
            tuned.append(evaluate_run(cfg).loss)
            first.append(result.first_loss)
            final.append(result.final_loss)
        rows[mode] = {"overrides": MODES[mode], "base_pretrain_eval_loss": base_pre, "base_task_eval_loss": base_task,
                      "finetune_first_loss": first, "finetune_final_loss": final, "tuned_task_eval_losses": tuned,
                      "tuned_task_eval_loss": sum(tuned) / len(tuned)}
        print(f"{mode:>15}: base eval {base_pre:.4f} (pretraining kind), {base_task:.4f} (task); after LoRA "
              + ", ".join(f"{t:.4f}" for t in tuned) + " (one per seed)", flush=True)
    reference = rows.get("fp32")
    if reference:
        for row in rows.values():
            row["base_pretrain_delta"] = row["base_pretrain_eval_loss"] - reference["base_pretrain_eval_loss"]
            row["tuned_task_delta"] = row["tuned_task_eval_loss"] - reference["tuned_task_eval_loss"]
    return {"pretrain": pre, "finetune_steps": finetune_steps, "micro_batch": micro_batch, "shape": shape,
            "modes": rows, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                       "cpu": platform.processor() or platform.machine()}}


def report(result: dict) -> str:
    """The results as a markdown table (what docs/qlora.md shows)."""
    lines = ["| base stored as | base eval loss, pretraining kind (vs fp32) | base eval loss, task "
             "| after LoRA, task: per seed | mean vs fp32 |", "|---|---|---|---|---|"]
    for mode, row in result["modes"].items():
        lines.append(f"| {mode} | {row['base_pretrain_eval_loss']:.4f} ({row.get('base_pretrain_delta', 0):+.5f}) "
                     f"| {row['base_task_eval_loss']:.4f} "
                     f"| {' / '.join(f'{t:.4f}' for t in row['tuned_task_eval_losses'])} "
                     f"| {row.get('tuned_task_delta', 0):+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="/tmp/lora_dist_accuracy", help="models, data and runs")
    parser.add_argument("--out", default="bench/results/accuracy.json")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2, help="fine-tunes per storage (LoRA init and data order)")
    parser.add_argument("--modes", nargs="*", choices=list(MODES), help="default: all")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(Path(args.work_dir), args.pretrain_steps, args.finetune_steps, args.seeds, args.modes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
