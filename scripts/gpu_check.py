"""The first-GPU check: each CUDA/NCCL path of lora_dist, run once, results written as JSON + Markdown.

    python scripts/gpu_check.py [--out bench/results/gpu] [--work DIR] [--budget-s S] [--cpu-smoke]

Every check records ok / FAIL / skipped with its numbers; the script goes on after a failure
and exits 1 if any check failed. The results files are rewritten after every check, so a run
cut off by its host's time limit still leaves what it found; a check that would start after
``--budget-s`` seconds is skipped, saying so, and the benchmark gets the time that is left.
With ``--cpu-smoke`` (CI) the checks that need no GPU run on the CPU with gloo, so the script
itself stays working; the CUDA ones are skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS: list[dict] = []


def check(name: str, needs_cuda: bool = False, needs_gpus: int = 1):
    def decorate(fn):
        def run(ctx):
            if needs_cuda and not ctx.get("dry_run") and (not ctx["cuda"] or torch.cuda.device_count() < needs_gpus):
                RESULTS.append({"check": name, "status": "skipped", "detail": f"needs {needs_gpus} CUDA GPU(s)"})
                return
            if _time_left(ctx) <= 0:
                RESULTS.append({"check": name, "status": "skipped",
                                "detail": f"out of time (--budget-s {ctx['budget_s']:.0f})"})
                return
            t0 = time.perf_counter()
            try:
                detail = fn(ctx) or ""
                status = "ok"
            except Exception as e:  # record and go on: one prepared run should show every failure
                detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                status = "FAIL"
            RESULTS.append({"check": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
                            "detail": detail})
            print(f"[{status}] {name}: {str(detail).splitlines()[0] if detail else ''}", flush=True)
        run.check_name, run.__name__ = name, fn.__name__
        return run
    return decorate


def _time_left(ctx) -> float:
    return ctx["budget_s"] - (time.perf_counter() - ctx["t0"])


def _sh(cmd: list[str], env: dict | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exit {proc.returncode}: {_root_cause(proc.stdout + proc.stderr)}")
    return proc.stdout


def _root_cause(log: str) -> str:
    """The child's own error lines, not torchrun's ChildFailedError trace around them."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines)
              if line.startswith("Traceback") or ("lora-dist" in line and "error" in line.lower())]
    first = [i for i in starts if not any("torch/distributed/run.py" in x for x in lines[i:i + 4])]
    if not first:
        return log[-1500:]
    block = lines[first[0]:first[0] + 60]
    return "\n".join(x for x in block if "elastic" not in x)[:3000]


def _torchrun(nproc: int, *args: str, env: dict | None = None) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _sh([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
                "-m", "lora_dist.cli", *args], env=env)


@check("device selection probes")
def device_probes(ctx):
    from lora_dist.launch import LaunchEnv, select_device

    def env(local_rank, local_world):
        return LaunchEnv("torchrun", local_rank, local_rank, local_world, local_world, 0, 1, "127.0.0.1", 0)

    cases = {"8 GPUs, local rank 3": (env(3, 8), 8, "cuda:3"), "1 GPU per task, local rank 5": (env(5, 8), 1, "cuda:0"),
             "4 GPUs per task (--gpu-bind=closest), local rank 5": (env(5, 8), 4, "cuda:1"),
             "no GPU": (env(1, 2), 0, "cpu")}
    for label, (launch, count, want) in cases.items():
        got = str(select_device(launch, cuda_count=count))
        assert got == want, f"{label}: {got} != {want}"
    if ctx["cuda"]:
        real = select_device(env(0, 1))
        return f"probes ok; this host: {torch.cuda.device_count()} GPU(s), rank 0 -> {real}"
    return "probes ok"


@check("LoRALinear forward/backward in fp32 and bf16")
def lora_linear(ctx):
    from lora_dist.lora import LoRAConfig, inject_lora, lora_parameters

    device = ctx["device"]
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)).to(device, dtype)
        inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["0", "1"]))
        model.to(device)
        for p in lora_parameters(model):
            torch.nn.init.normal_(p, std=0.02)
        x = torch.randn(4, 64, 256, device=device, dtype=dtype)
        model(x).float().square().mean().backward()
        grads = [p.grad for p in lora_parameters(model)]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        lines.append(f"{dtype}: LoRA grads fp32 and finite")
    return "; ".join(lines)


@check("fused LoRA layer with dropout equals the layer as separate ops (nn.Dropout), same seed")
def fused_dropout(ctx):
    """The fused autograd node (``lora._LoRALinearFunction``) with dropout on, against the same layer run as
    separate autograd ops with its ``nn.Dropout``, from the same generator state: the output and the grads of x, A
    and B agree only if the fused layer drew nn.Dropout's mask on this device."""
    from lora_dist.lora import LoRALinear, _dropout

    device, p, lines = ctx["device"], 0.3, []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layer = LoRALinear.from_base(torch.nn.Linear(256, 384, dtype=dtype), r=8, alpha=16, dropout=p).to(device)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        x = torch.randn(4, 64, 256, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(4, 64, 384, device=device, dtype=dtype)
        params = (x, layer.lora_A.weight, layer.lora_B.weight)

        def run(fused: bool):
            for t in params:
                t.grad = None
            if not fused:
                layer._fusable = lambda *args: False
            try:
                torch.manual_seed(7)
                out = layer(x)
            finally:
                if not fused:
                    del layer._fusable
            assert (type(out.grad_fn).__name__ == "_LoRALinearFunctionBackward") == fused, type(out.grad_fn)
            out.backward(grad)
            return (out.detach(), *(t.grad.clone() for t in params))

        fused, separate = run(True), run(False)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for label, got, want in zip(("out", "x grad", "A grad", "B grad"), fused, separate):
            err = float((got.float() - want.float()).abs().max()) / max(float(want.float().abs().max()), 1e-12)
            assert err <= tol, f"{dtype} {label}: max |diff| / max |ref| {err:.3g} > {tol}"
        torch.manual_seed(7)
        _, noise, mask = _dropout(x.detach().reshape(-1, 256), p)
        kept = float((noise != 0).float().mean() if mask is None else mask.float().mean())
        assert abs(kept - (1 - p)) < 0.01, f"kept {kept:.3f} of the LoRA input, expected {1 - p}"
        lines.append(f"{dtype}: equal within {tol}, kept {kept:.3f}, "
                     f"{'the bernoulli mask' if mask is None else 'torch fused kernel'}")
    return "; ".join(lines)


@check("merge on the device equals the CPU merge (fp32 bound)")
def merge_on_device(ctx):
    from lora_dist.merge import LoRAWeights, merge_weight

    g = torch.Generator().manual_seed(0)
    w0, a, b = torch.randn(512, 256, generator=g), torch.randn(16, 256, generator=g), torch.randn(512, 16, generator=g)
    cpu = merge_weight(w0, LoRAWeights(a, b, 2.0), out_dtype=torch.float32)
    dev = merge_weight(w0.to(ctx["device"]), LoRAWeights(a.to(ctx["device"]), b.to(ctx["device"]), 2.0),
                       out_dtype=torch.float32).cpu()
    diff = (cpu - dev).abs().max().item()
    bound = 2 * 17 * torch.finfo(torch.float32).eps * float((b.abs() @ a.abs()).max()) * 2 + 1e-6
    assert diff <= bound, f"max |diff| {diff:.3g} > bound {bound:.3g}"
    return f"max |diff| {diff:.3g} (bound {bound:.3g})"


def _verify(out: Path, base: Path) -> None:
    """``lora-dist verify`` of a run's merged export against its base and adapter."""
    _sh([sys.executable, "-m", "lora_dist.cli", "verify", str(out / "merged"), "--base", str(base),
         "--adapter", str(out / "adapter")])


def _run_config(ctx, name: str, *overrides: str, nproc: int = 1) -> Path:
    out = ctx["work"] / name
    _torchrun(nproc, "train", f"model.path={ctx['base']}", f"data.path={ctx['data']}", f"output.dir={out}",
              "train.steps=4", "train.seq_len=64", "lora.r=4", "data.eval_fraction=0", *overrides)
    return out


@check("fsdp2: bf16, activation checkpointing, checkpoint, resume, merged export + verify")
def fsdp2_full(ctx):
    bf16 = ["parallel.mixed_precision=bfloat16"] if ctx["cuda"] else []
    out = _run_config(ctx, "fsdp2", "parallel.strategy=fsdp2", "parallel.activation_checkpointing=true",
                      "checkpoint.every=2", "train.run_steps=2", *bf16)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    _run_config(ctx, "fsdp2", "parallel.strategy=fsdp2", "parallel.activation_checkpointing=true",
                "checkpoint.every=2", "export.merged=true", "export.dtype=float32", *bf16)
    _verify(out, ctx["base"])
    return _memory(out)


@check("NF4 (QLoRA): decoder bitwise torchao on the device; bf16 NF4 runs (fsdp2 on one GPU runs as none), "
       "merged export + verify; the time of the loss through an NF4 head in blocks", needs_cuda=True)
def nf4(ctx):
    from lora_dist.nf4 import dequantize, embedding_rows, nf4_module

    module, lines = nf4_module(), []
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device=ctx["device"]).manual_seed(0)
        t = module.to_nf4(torch.randn(768, 2048, device=ctx["device"], dtype=dtype, generator=g))
        want = t.get_original_weight()
        assert torch.equal(dequantize(t), want), f"{dtype}: dequantize differs from torchao's"
        ids = torch.randint(0, 768, (3, 50), device=ctx["device"], generator=g)
        assert torch.equal(embedding_rows(t, ids), want[ids]), f"{dtype}: embedding rows differ from torchao's"
        lines.append(f"{dtype} decoder == torchao")
    from safetensors import safe_open

    from lora_dist.demo import make_tiny_checkpoint

    # A vocabulary of 512 x 128: the embedding and the head are whole NF4 groups (the shared base's 489 rows are not).
    base = make_tiny_checkpoint(ctx["work"] / "base-512", arch="llama", hidden=128, layers=2, heads=4, vocab=512)
    for name, extra in (("nf4", ()), ("nf4-all", ("model.quantize_embeddings=true",))):
        out = _run_config(ctx, name, f"model.path={base}", "parallel.strategy=fsdp2", "model.dtype=bfloat16",
                          "model.quantize=nf4", "parallel.mixed_precision=bfloat16", "export.merged=true",
                          "export.dtype=float32", *extra)
        _verify(out, base)
        with safe_open(str(out / "merged" / "model.safetensors"), "pt") as fh:
            quantized = fh.metadata()["lora_dist_quantized_weights"].split(",")
        embeddings = {"model.embed_tokens.weight", "lm_head.weight"} & set(quantized)
        assert len(embeddings) == (2 if extra else 0), f"{name}: NF4 embedding/head {sorted(embeddings)}"
        lines.append(f"{name}: {len(quantized)} NF4 weights, {_memory(out)}, merged export verified")
    lines.append(_nf4_head_loss_time(ctx))
    return "; ".join(lines)


def _nf4_head_loss_time(ctx) -> str:
    """The loss through an NF4 head dequantized HEAD_BLOCK_ROWS rows at a time (model.quantize_embeddings), forward
    and backward, against the same head dequantized once per step (what the loss did before): what the blocks'
    repeated dequantization costs on this device, for the head left sharded (fsdp2's default: each block decoded
    twice per chunk; here a one-rank group) and for the whole head (ddp, parallel.gather_head). A 128k-vocabulary
    head's shard on 8 ranks at width 4096 on a GPU (small on the CPU of a dry run)."""
    import torch.distributed as dist

    from lora_dist.loss import HEAD_BLOCK_ROWS, linear_cross_entropy_sum
    from lora_dist.nf4 import dequantize, nf4_module

    device = torch.device(ctx["device"])
    rows, width, tokens = (16032, 4096, 4096) if device.type == "cuda" else (4608, 256, 256)
    g = torch.Generator(device=device).manual_seed(1)
    head = nf4_module().to_nf4(torch.randn(rows, width, device=device, dtype=torch.bfloat16, generator=g) / 64)
    hidden = torch.randn(1, tokens, width, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    labels = torch.randint(0, rows, (1, tokens), device=device, generator=g)

    def seconds(weight_of_step, group) -> float:
        def step():
            linear_cross_entropy_sum(hidden, weight_of_step(), None, labels, 1024, 0, group).backward()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 5

    own_group = not dist.is_initialized()
    if own_group:  # one rank: the sharded path issues no collective
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parts = []
        sharded = [("sharded", dist.group.WORLD)] if dist.get_world_size() == 1 else []
        for name, group in (*sharded, ("whole", None)):
            blocks = seconds(lambda: head, group)
            once = seconds(lambda: dequantize(head, torch.bfloat16), group)
            parts.append(f"{name} {blocks * 1e3:.1f} ms, dequantized once per step {once * 1e3:.1f} ms "
                         f"({blocks / once:.2f}x)")
    finally:
        if own_group:
            dist.destroy_process_group()
    return (f"NF4 head loss ({tokens} tokens x {rows} rows x {width}, blocks of {HEAD_BLOCK_ROWS} rows): "
            + "; ".join(parts))


@check("compiled blocks (parallel.compile): whole graphs on the device (a checkpointed block too), bf16 losses "
       "follow the eager run's, merged export + verify", needs_cuda=True)
def compiled(ctx):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lora_dist.config import load_config
    from lora_dist.launch import LaunchEnv
    from lora_dist.model_dir import ModelDir
    from lora_dist.session import build

    # In this process first: the blocks compile for the GPU without a graph break or a fallback to eager, the first
    # one checkpointed and the second not (every 2nd block: a checkpoint's side effects must not split the graph).
    cfg = load_config(None, [f"model.path={ctx['base']}", "parallel.strategy=none", "parallel.compile=true",
                             "parallel.activation_checkpointing=2", "model.dtype=bfloat16", "lora.r=4",
                             "output.dir=unused"])
    env = LaunchEnv("torchrun", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500)
    _, engine = build(cfg, env, ctx["device"], ModelDir(ctx["base"]), None)
    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    try:
        for length in (64, 48, 64):
            ids = torch.randint(0, 400, (2, length), device=ctx["device"])
            engine.forward_loss_sum({"input_ids": ids}, ids).backward()
    finally:
        torch._dynamo.config.fail_on_recompile_limit_hit = False
    graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    del engine
    torch._dynamo.reset()  # the compiled graphs and what they hold, not kept for the checks after this one
    assert graphs >= 2 and not breaks, (graphs, breaks)
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("parallel.compile=true", "export.merged=true",
                                                      "export.dtype=float32"))):
        out = _run_config(ctx, f"compile-{name}", "parallel.strategy=fsdp2", "model.dtype=bfloat16", *extra)
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    _verify(ctx["work"] / "compile-compiled", ctx["base"])
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in runs.items()}
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["compiled"], losses["eager"]))
    assert len(losses["compiled"]) == len(losses["eager"]) and worst < 2e-2, losses
    last = {k: [r["step_time_s"] for r in v if "step_time_s" in r][-1] for k, v in runs.items()}
    return (f"{graphs} graphs, no graph break; losses within {worst:.2g} (relative); last step {last['compiled'] * 1e3:.1f} ms compiled vs "
            f"{last['eager'] * 1e3:.1f} ms eager (tiny model: the bench row measures speed); merged export verified")


@check("fsdp2 + cpu_offload, merged export + verify", needs_cuda=True)
def fsdp2_offload(ctx):
    out = _run_config(ctx, "offload", "parallel.strategy=fsdp2", "parallel.cpu_offload=true", "export.merged=true",
                      "export.dtype=float32")
    _verify(out, ctx["base"])
    return _memory(out) + "; merged export verified"


@check("fsdp2: one unit per weight, checkpointed inputs in pinned host memory", needs_cuda=True)
def fsdp2_weight_units_offload(ctx):
    return _memory(_run_config(ctx, "weight-units", "parallel.strategy=fsdp2", "parallel.activation_checkpointing=true",
                               "parallel.shard_unit=weight", "parallel.offload_activations=true",
                               "parallel.mixed_precision=bfloat16"))


@check("zero3 + activation checkpointing", needs_cuda=True)
def zero3_ac(ctx):
    return _memory(_run_config(ctx, "zero3", "parallel.strategy=zero3", "parallel.activation_checkpointing=true"))


@check("zero2 bf16: the adapter is fp32, the merged export is the fp32 base + adapter (verify at fp32's tolerance)",
       needs_cuda=True)
def zero2_bf16(ctx):
    from safetensors.torch import load_file

    out = _run_config(ctx, "zero2", "parallel.strategy=zero2", "parallel.mixed_precision=bfloat16",
                      "export.merged=true", "export.dtype=float32")
    _verify(out, ctx["base"])  # merged from the base files and the fp32 masters: recorded as float32
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    rounded = sum(bool(torch.equal(t, t.bfloat16().float())) for t in tensors.values() if t.abs().max() > 0)
    return f"{len(tensors)} fp32 tensors, {rounded} exactly bf16-representable; " + _memory(out)


@check("ddp", needs_cuda=True)
def ddp(ctx):
    return _memory(_run_config(ctx, "ddp", "parallel.strategy=ddp"))


#: What 2 ranks run against the one process: every path with lora_dist's own NCCL collectives (the sharded AdamW,
#: the vocabulary-sharded head and embedding, the replica check, the merged export from 2 ranks' shards, the
#: unsharded optimizer's gradient reducer, DDP) and DeepSpeed's.
TWO_RANKS = {
    "fsdp2": ("parallel.strategy=fsdp2", "parallel.replica_check_every=1", "export.merged=true",
              "export.dtype=float32"),
    "zero3": ("parallel.strategy=zero3",),
    "ddp-unsharded-optimizer": ("parallel.strategy=ddp", "parallel.shard_optimizer=false"),
    "fsdp2-unsharded-optimizer": ("parallel.strategy=fsdp2", "parallel.shard_optimizer=false"),
}


def _adapter_diff(out: Path, ref: dict) -> float:
    from safetensors.torch import load_file

    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == ref.keys(), f"{out.name}: other adapter tensors"
    return max(float((got[k] - ref[k]).abs().max()) for k in ref)


def _reference(ctx) -> dict:
    """The one-process adapter the multi-rank checks compare with (trained once)."""
    from safetensors.torch import load_file

    if "reference" not in ctx:
        out = _run_config(ctx, "ref", "parallel.strategy=none", "train.micro_batch_size=4")
        ctx["reference"] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return ctx["reference"]


@check("2 ranks: fsdp2 (replica check, merged export), zero3, ddp and the unsharded optimizer equal 1 process",
       needs_cuda=True, needs_gpus=2)
def two_ranks(ctx):
    ref = _reference(ctx)
    lines = []
    for name, overrides in TWO_RANKS.items():
        out = _run_config(ctx, f"two-{name}", *overrides, "train.micro_batch_size=2", nproc=2)
        diff = _adapter_diff(out, ref)
        assert diff < 1e-4, f"{name}: max |diff| {diff:.3g}"
        if "export.merged=true" in overrides:
            _verify(out, ctx["base"])
        lines.append(f"{name} max |diff| {diff:.3g}")
    return "; ".join(lines)


@check("4 ranks: hybrid sharding equals 1 process; an NF4 base resharded to 2 after forward equals it resharded "
       "fully", needs_cuda=True, needs_gpus=4)
def four_ranks(ctx):
    from safetensors.torch import load_file

    from lora_dist.demo import make_tiny_checkpoint

    ref = _reference(ctx)
    hybrid = _adapter_diff(_run_config(ctx, "four-hybrid", "parallel.strategy=fsdp2", "parallel.dp_replicate=2",
                                       "train.micro_batch_size=1", nproc=4), ref)
    assert hybrid < 1e-4, f"hybrid: max |diff| {hybrid:.3g}"
    # 512 wide: a quarter of each block weight is whole NF4 groups (128 wide, none is, and nothing is quantized)
    base = make_tiny_checkpoint(ctx["work"] / "base-wide", arch="llama", hidden=512, layers=2, heads=4)
    nf4 = (f"model.path={base}", "parallel.strategy=fsdp2", "model.dtype=bfloat16", "model.quantize=nf4",
           "train.micro_batch_size=1")
    full = load_file(str(_run_config(ctx, "four-nf4-full", *nf4, nproc=4) / "adapter" / "adapter_model.safetensors"))
    to_two = _adapter_diff(_run_config(ctx, "four-nf4-reshard-2", *nf4, "parallel.reshard_after_forward=2",
                                       nproc=4), full)
    assert to_two < 1e-5, f"nf4 resharded to 2: max |diff| {to_two:.3g}"
    return f"hybrid max |diff| {hybrid:.3g}; nf4 resharded to 2 vs fully {to_two:.3g}"


#: The one-GPU comparison: PEFT + accelerate against lora_dist, bf16, same model, data and steps.
#: 16 x 2048 tokens a step: enough to keep the GPU busy (at 4 x 2048 the steps were bound by the host; docs/gpu.md).
BENCH_ARGS = ("--nproc", "1", "--sizes", "llama-440m", "--seq-len", "2048", "--micro-batch", "16",
              "--timed-steps", "10", "--configs", "peft_accelerate_fsdp2_bf16", "lora_dist_fsdp2_bf16", "lora_dist_auto_bf16", "lora_dist_nf4",
              "lora_dist_auto_bf16_compile",
              "--profile")


@check("lora-dist bench on one GPU: PEFT + accelerate against lora_dist, bf16", needs_cuda=True)
def bench(ctx):
    out = ctx["work"] / "bench"
    try:
        _sh([sys.executable, "-m", "lora_dist.cli", "bench", *BENCH_ARGS, "--out", str(out),
             "--work-dir", str(ctx["work"] / "bench-work")], timeout=max(60, int(min(_time_left(ctx), 3600))))
    finally:  # the report says which configuration failed, and why
        for name in ("results.json", "results.md"):
            if (out / name).exists():
                (ctx["out"] / f"bench-{name}").write_bytes((out / name).read_bytes())
        profiles = sorted((out / "profiles").glob("*.txt"))  # one more step of each, by device time
        if profiles:
            text = "".join(f"## {p.stem}\n{p.read_text()}\n" for p in profiles)
            (ctx["out"] / "bench-profiles.txt").write_text(text)
    return f"report in {ctx['out'] / 'bench-results.md'}"


def _memory(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["memory_gb"] for r in rows if "memory_gb" in r]
    return f"loss {rows[0].get('loss', float('nan')):.3f} -> {rows[-1].get('loss', float('nan')):.3f}; " \
           f"per-step peak memory {min(peaks):.3f}-{max(peaks):.3f} GB" if peaks else "no metrics"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu")
    parser.add_argument("--work", default=None, help="checkpoints and run outputs (default OUT/<device>/work)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no check after this many seconds; the benchmark gets what is left")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the CPU-possible checks on the CPU (CI)")
    parser.add_argument("--checks", nargs="*", help="run only these checks (function names, e.g. fsdp2_offload bench)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --cpu-smoke: run the GPU checks too, on the CPU with gloo (their code, before a "
                             "lease; some need CUDA and fail)")
    args = parser.parse_args()
    # the paths no GPU has run yet first, then the benchmark, then the ones an earlier GPU run passed
    checks = (device_probes, lora_linear, fused_dropout, merge_on_device, nf4, fsdp2_full, compiled, fsdp2_offload, bench,
              two_ranks, four_ranks, fsdp2_weight_units_offload, zero3_ac, zero2_bf16, ddp)
    unknown = set(args.checks or ()) - {fn.__name__ for fn in checks}
    if unknown:
        parser.error(f"unknown check {sorted(unknown)[0]!r}; choose from {[fn.__name__ for fn in checks]}")
    if args.cpu_smoke:  # the launches the checks start (torchrun, lora-dist) would otherwise find the GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import transformers  # printed here, not by a Python of its own: its imports cost seconds of a short lease

    print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, flush=True)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("no CUDA device visible; run with --cpu-smoke for the CPU-possible checks", file=sys.stderr)
        return 2
    from lora_dist.demo import make_tiny_checkpoint, write_demo_data

    label = torch.cuda.get_device_name(0).replace(" ", "-") if cuda else "cpu-smoke"
    out = Path(args.out) / label
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run and not args.cpu_smoke:
        parser.error("--dry-run goes with --cpu-smoke")
    ctx = {"cuda": cuda, "dry_run": args.dry_run, "t0": time.perf_counter(), "budget_s": args.budget_s,
           "device": torch.device("cuda", 0) if cuda else torch.device("cpu"), "out": out, "work": work,
           "base": make_tiny_checkpoint(work / "base", arch="llama", hidden=128, layers=2, heads=4),
           "data": write_demo_data(work / "data.jsonl", n=200)}
    info = {"device": label, "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, module in (("transformers", "transformers"), ("deepspeed", "deepspeed"), ("peft", "peft"),
                         ("accelerate", "accelerate"), ("torchao", "torchao")):
        try:
            info[name] = __import__(module).__version__
        except Exception as e:  # a missing package fails its checks below, with the reason
            info[name] = f"not importable ({type(e).__name__})"
    for fn in checks:
        if args.checks and fn.__name__ not in args.checks:
            continue
        fn(ctx)
        _write(out, info)
    print(f"results in {out}")
    return 1 if any(r["status"] == "FAIL" for r in RESULTS) else 0


def _write(out: Path, info: dict) -> None:
    (out / "results.json").write_text(json.dumps({"machine": info, "checks": RESULTS}, indent=2) + "\n")
    lines = [f"# GPU check on {info['device']}", "", f"{info}", "", "| check | status | seconds | detail |",
             "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r.get('seconds', '')} | {str(r['detail']).splitlines()[0] if r['detail'] else ''} |"
              for r in RESULTS]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
