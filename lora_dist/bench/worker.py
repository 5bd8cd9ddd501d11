"""One configuration on every rank: run under torchrun by :mod:`lora_dist.bench.run`.

    python -m torch.distributed.run --nproc_per_node W -m lora_dist.bench.worker JOB.json
    python -m torch.distributed.run ... -m lora_dist.bench.worker export_run RUN_DIR OUT RESULT_DIR  (lora-dist export)
    python -m lora_dist.bench.worker merge BASE ADAPTER OUT RESULT.json                  (lora-dist merge)

or forked by ``lora-dist bench --launcher fork`` (:func:`lora_dist.bench.run._fork_launch`).

Phases, each with its own memory high-water mark (:mod:`lora_dist.bench.measure`):
setup (load and wrap the model), train (warm-up steps and one more), timed steps
(no memory sampling), one instrumented step (live tensor bytes, bytes communicated), timed forward
passes, and optionally a merged export. Every rank writes
``<out>/rank<R>.json``.

Every worker imports the same libraries (torch, transformers, PEFT,
accelerate, DeepSpeed) before its baseline RSS is taken, so the baseline is
the same for every configuration and differences come from the method.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall time between two barriers, and this process's CPU time (all threads) over the same span."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


#: Operators whose self time is a matmul, and name fragments of attention kernels (``--profile``'s breakdown).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention")


def _profile(fn, device: torch.device, rows: int = 30) -> dict:
    """``fn`` once under ``torch.profiler``: the operators that took the most self time (on the device where it is
    a GPU), as the profiler's table, and on a CPU the step's self time split into matmuls, attention and the rest
    (seconds; ``None`` on a GPU, where kernels are not attributed to operators this way)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        fn()
        _sync(device)
    ops = prof.key_averages()
    self_times = None
    if not cuda:
        seconds = {e.key: e.self_cpu_time_total / 1e6 for e in ops}
        self_times = {"total": sum(seconds.values()),
                      "matmul": sum(t for k, t in seconds.items() if k in MATMUL_OPS),
                      "attention": sum(t for k, t in seconds.items() if any(a in k for a in ATTENTION_OPS))}
    return {"table": ops.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows),
            "self_times": self_times}


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import accelerate  # noqa: F401 - equal baseline for every configuration (see the module docstring)
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    from lora_dist.bench.measure import CommCounter, LiveTensorBytes, PhaseMemory, read_status_kb
    from lora_dist.bench.systems import BenchSettings, make_system
    from lora_dist.data import load_dataset
    from lora_dist.launch import exit_distributed, init_distributed, run_device

    env = init_distributed(timeout_s=1800)
    device = run_device()
    torch.manual_seed(0)
    settings = BenchSettings(**job["settings"])
    out = Path(job["out"])
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    data = load_dataset(settings.data_path, tokenizer, settings.seq_len, None)
    global_micro = settings.micro_batch * env.world_size

    def batch(k: int):
        """The k-th global micro-batch's share of this rank, the same for every configuration, as the system's own
        loop hands it to a step (:meth:`System.prepare`, outside the timed step)."""
        ids, labels = data.batch(k * global_micro + env.rank * settings.micro_batch, settings.micro_batch, settings.seed)
        return system.prepare(ids, labels)

    dist.barrier()
    status = read_status_kb("VmRSS", "RssAnon")
    result: dict = {"rank": env.rank, "world_size": env.world_size, "config": job["config"], "device": str(device),
                    "baseline": {"rss": status["VmRSS"], "anon": status.get("RssAnon", 0)},
                    "tokens_per_step": global_micro * settings.seq_len}

    system = make_system(job["config"], settings, device)
    with PhaseMemory(device) as setup:
        system.setup()
        dist.barrier()
    result["setup"] = setup.as_dict()
    result["base_bytes"] = system.base_bytes()
    if hasattr(system, "plan"):  # lora_dist: the planner's peak for this very configuration and launch
        result["plan"] = system.plan()

    step = 0
    # The training peak over the warm-up and one more (steady-state) step. The timed steps run after it, without
    # the phase's RSS sampler: a Python thread waking every 5 ms takes the GIL from the step's own Python (module
    # calls, autograd functions, hooks) and was measured to add ~5% to a ddp step here.
    with PhaseMemory(device) as train:
        for _ in range(job["warmup_steps"] + 1):
            system.train_step(batch(step))
            step += 1
    timed = []
    for _ in range(job["timed_steps"]):
        prepared = batch(step)
        timed.append(_timed(lambda: system.train_step(prepared), device))
        step += 1
    result["train"] = {**train.as_dict(), "step_times": [t for t, _ in timed], "step_cpu_times": [c for _, c in timed]}

    comm = CommCounter(env.world_size)
    tracker = LiveTensorBytes(device.type) if device.type == "cpu" and system.counts_tensors else None
    prepared = batch(step)
    dist.barrier()
    with comm, (tracker if tracker is not None else contextlib.nullcontext()):
        system.train_step(prepared)
    step += 1
    result["instrumented_step"] = {"comm": comm.as_dict()}
    if tracker is not None:
        result["instrumented_step"].update(tensor_start=tracker.start, tensor_peak=tracker.peak)

    prepared = batch(step)
    system.forward(prepared)  # warm-up
    timed = [_timed(lambda: system.forward(prepared), device) for _ in range(job["forward_reps"])]
    result["forward"] = {"times": [t for t, _ in timed], "cpu_times": [c for _, c in timed]}
    if job.get("profile"):  # one more step under the profiler, after everything timed
        prepared = batch(step)
        result["profile"] = _profile(lambda: system.train_step(prepared), device)
        step += 1

    if job.get("export_dir") and system.can_export:
        export_dir = Path(job["export_dir"])
        with PhaseMemory(device) as export:
            _sync(device)
            system.export(export_dir)
            _sync(device)
        result["export"] = export.as_dict()
        if device.type == "cpu":  # again, counting tensors (the dispatch mode would skew the timed run)
            tracker = LiveTensorBytes("cpu")
            with tracker:
                system.export(export_dir.with_name(export_dir.name + "-counted"))
            result["export"]["tensor_peak"] = tracker.peak
            result["export"]["tensor_start"] = tracker.start
    if job.get("adapter_dir"):
        system.save_adapter(Path(job["adapter_dir"]))
    result["params"] = system.param_counts()
    result["reproduced"] = system.reproduced
    result["notes"] = system.notes
    result["description"] = system.description
    result["final_rss"] = read_status_kb("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    exit_distributed()  # no interpreter teardown: it can abort a finished rank (see exit_distributed)


def merge_main(base: str, adapter: str, out: str, result_path: str) -> None:
    """``lora-dist merge`` in this process (the CLI's own parsing included), timed without
    the interpreter's start-up, with the phase's peak RSS above the pre-merge baseline."""
    from lora_dist.bench.measure import PhaseMemory, read_status_kb
    from lora_dist.cli import main

    baseline = read_status_kb("VmRSS", "RssAnon")
    with PhaseMemory(torch.device("cpu")) as phase:
        code = main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--overwrite"])
    Path(result_path).write_text(json.dumps({"exit_code": code, "baseline": baseline, **phase.as_dict()}))


def export_run_main(run_dir: str, out: str, result_dir: str) -> None:
    """``lora-dist export RUN_DIR`` on every rank, its export call measured as a phase of its own (``export_merged``
    on several ranks, ``merge_offline`` on one process).

    The command rebuilds the sharded model and loads the run's adapter, then
    exports; the load is part of the command's overall peak, recorded too.
    """
    import accelerate  # noqa: F401 - the same baseline as the training workers
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers

    transformers.logging.set_verbosity_error()
    import lora_dist.session as session
    from lora_dist.bench.measure import LiveTensorBytes, PhaseMemory, read_status_kb
    from lora_dist.launch import exit_distributed, init_distributed, run_device

    env = init_distributed(timeout_s=1800)
    device = run_device()
    dist.barrier()
    status = read_status_kb("VmRSS", "RssAnon")
    result: dict = {"rank": env.rank, "baseline": {"rss": status["VmRSS"], "anon": status.get("RssAnon", 0)}}
    def measured(real, out_at: int):
        """``real`` (its output dir the ``out_at``-th argument) measured as the export phase."""
        def run(*args, **kwargs):
            with PhaseMemory(device) as phase:
                _sync(device)
                written = real(*args, **kwargs)
                _sync(device)
            result["export"] = phase.as_dict()
            if device.type == "cpu":  # again, counting tensors (the dispatch mode would skew the timed run)
                counted = list(args)
                counted[out_at] = Path(str(args[out_at]) + "-counted")
                tracker = LiveTensorBytes("cpu")
                with tracker:
                    real(*counted, **kwargs)
                result["export"].update(tensor_start=tracker.start, tensor_peak=tracker.peak)
            return written
        return run

    # Several ranks merge their shards (export_merged); one process streams base + adapter (merge_offline): the names
    # export_run calls.
    session.export_merged = measured(session.export_merged, 1)
    session.merge_offline = measured(session.merge_offline, 2)
    with PhaseMemory(device) as command:
        session.export_run(run_dir, out=out, dtype="float32", overwrite=True)
    result["command"] = command.as_dict()
    Path(result_dir).mkdir(parents=True, exist_ok=True)
    (Path(result_dir) / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    exit_distributed()  # no interpreter teardown: it can abort a finished rank (see exit_distributed)


if __name__ == "__main__":
    if sys.argv[1] == "merge":
        merge_main(*sys.argv[2:6])
    elif sys.argv[1] == "export_run":
        export_run_main(*sys.argv[2:5])
    else:
        main(sys.argv[1])
