"""``lora-dist bench``: lora_dist against PEFT + accelerate, side by side.

For every model size, each configuration of :data:`bench.systems.SYSTEMS`
runs in its own ``torchrun`` launch (so peak RSS is per configuration), one
after another, on the same data and world size (:mod:`lora_dist.bench.worker`); with ``--launcher fork``
(CPU only) its ranks are forked from this process instead, which imported the workers' libraries once. Then
the offline ``lora-dist merge`` of the adapter lora_dist_fsdp2 trained runs
(in a fresh process, timed from its argument parsing to its return) against
a plain read-write-fsync copy of the same bytes, alternating, best of each. Results: ``results.json``,
``results.md`` and PNG plots in the output dir (:mod:`lora_dist.bench.report`).

Step times are the minimum over the timed steps (each between two barriers):
the machine may be shared, and the minimum is the estimate least affected by
other processes; medians are kept in the JSON, with the load average before
and after every launch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: The package measured; its sources are hashed into the results.
PACKAGE = Path(__file__).resolve().parents[1]
#: Results go under ``bench/results/`` of the working directory (a checkout: ``python -m bench`` from its root).
RESULTS = Path("bench") / "results"

from lora_dist.bench.models import FULL_SIZES, LARGE_SIZES, QUICK_SIZES, ModelSpec, build_checkpoint, write_data
from lora_dist.bench.systems import SYSTEMS

__all__ = ["BenchOptions", "add_arguments", "main", "run_bench"]

ANCHOR = "peft_accelerate_fsdp2"
#: Anchor first, so a later failure still leaves something to compare against.
ORDER = (ANCHOR, "lora_dist_fsdp2", "lora_dist_zero3", "lora_dist_ddp", "lora_dist_auto", "peft_accelerate_fsdp2_bf16",
         "lora_dist_fsdp2_bf16", "lora_dist_auto_bf16", "lora_dist_nf4", "lora_dist_nf4_all", "peft_accelerate_zero3",
         "full_ft_fsdp2")
EXPORTING = {"lora_dist_fsdp2", "lora_dist_zero3", ANCHOR}


@dataclass
class BenchOptions:
    """How the benchmark runs."""

    out: str = str(RESULTS)
    work_dir: str = str(Path(tempfile.gettempdir()) / "lora_dist_bench")
    quick: bool = False
    sizes: tuple[str, ...] = ()
    configs: tuple[str, ...] = ORDER
    nproc: int = 2
    seq_len: int = 512  # where the logits matter: a 32k-vocabulary head is the largest activation at 112M
    micro_batch: int = 1
    lora_r: int = 16
    warmup_steps: int = 1
    timed_steps: int = 3
    forward_reps: int = 2
    copy_reps: int = 2
    timeout_s: float = 1200.0
    profile: bool = False  # one more step per configuration under torch.profiler: <out>/profiles/<size>-<config>.txt
    launcher: str = "torchrun"  # or "fork": see _fork_launch

    def specs(self) -> list[ModelSpec]:
        pool = QUICK_SIZES if self.quick else FULL_SIZES
        if not self.sizes:
            return list(pool)
        by_name = {s.name: s for s in (*FULL_SIZES, *LARGE_SIZES, *QUICK_SIZES)}
        unknown = [n for n in self.sizes if n not in by_name]
        if unknown:
            raise SystemExit(f"lora-dist bench: unknown size {unknown[0]!r}; choose from {sorted(by_name)}")
        return [by_name[n] for n in self.sizes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover
        pass
    return env


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run_config(opts: BenchOptions, spec: ModelSpec, model_path: Path, data_path: Path, config: str,
                work: Path) -> dict:
    """One torchrun launch of :mod:`lora_dist.bench.worker`; returns the ranks' results (or the failure)."""
    run_dir = work / "runs" / spec.name / config
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    job = {
        "config": config,
        "settings": {"model_path": str(model_path), "data_path": str(data_path), "seq_len": opts.seq_len,
                     "micro_batch": opts.micro_batch, "lora_r": opts.lora_r, "lora_alpha": 2.0 * opts.lora_r},
        "out": str(run_dir / "result"),
        "warmup_steps": opts.warmup_steps, "timed_steps": opts.timed_steps, "forward_reps": opts.forward_reps,
        "export_dir": str(run_dir / "export") if config in EXPORTING else None,
        "adapter_dir": str(run_dir / "adapter") if config == "lora_dist_fsdp2" else None,
        "profile": opts.profile,
    }
    job_path = run_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    load_before = _loadavg()
    t0 = time.perf_counter()
    code = _launch(opts, [str(job_path)], run_dir / "log.txt")
    record = {"config": config, "launch_wall_s": time.perf_counter() - t0, "loadavg_before": load_before,
              "loadavg_after": _loadavg(), "exit_code": code}
    ranks = sorted((run_dir / "result").glob("rank*.json"))
    if code != 0 or len(ranks) != opts.nproc:
        tail = (run_dir / "log.txt").read_text(errors="replace").splitlines()[-25:]
        record["error"] = "\n".join(tail)
        _log(f"{spec.name} {config}: FAILED (exit {code}); log in {run_dir / 'log.txt'}")
        return record
    record["ranks"] = [json.loads(p.read_text()) for p in ranks]
    if job["adapter_dir"]:
        record["adapter_dir"] = job["adapter_dir"]
    for export in run_dir.glob("export*"):
        shutil.rmtree(export)  # measured; the bytes are not needed
    return record


def _launch(opts: BenchOptions, args: list[str], log_path: Path) -> int | str:
    """``opts.nproc`` ranks of :mod:`lora_dist.bench.worker` ``ARGS``; the exit code (0: every rank succeeded)."""
    if opts.launcher == "fork":
        return _fork_launch(args, log_path, opts.nproc, opts.timeout_s)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opts.nproc}",
           f"--master_port={_free_port()}", "-m", "lora_dist.bench.worker", *args]
    with log_path.open("w") as log:
        try:
            return subprocess.run(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=opts.timeout_s).returncode
        except subprocess.TimeoutExpired:
            return "timeout"


#: Seconds the other ranks of a fork launch get to finish once one failed, as torchrun's agent gives them.
GRACE_S = 10.0
#: What :mod:`lora_dist.bench.worker` imports before its baseline (its docstring), imported once by a fork launch.
WORKER_IMPORTS = ("accelerate", "deepspeed", "peft", "transformers", "lora_dist.bench.measure",
                  "lora_dist.bench.systems", "lora_dist.data", "lora_dist.launch", "lora_dist.session")


def _fork_launch(args: list[str], log_path: Path, nproc: int, timeout_s: float) -> int | str:
    """The worker's ranks forked from this process, which has imported their libraries once: a CPU smoke run's
    launches then cost milliseconds instead of each rank's ~10 s of imports (torch, transformers, PEFT, accelerate,
    DeepSpeed), most of a tiny configuration's launch. Every configuration is launched the same way, so the
    comparison stays side by side; each still runs in processes of its own, with its own peak RSS.

    The ranks see a launch by hand (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...) and rendezvous for real.
    ``nproc`` 0 runs one plain process. CPU only: a process forked after its parent used CUDA cannot use it.
    """
    import torch

    if torch.cuda.is_available() or torch.cuda.is_initialized():
        raise SystemExit("lora-dist bench: --launcher fork runs on the CPU only (a forked process cannot use CUDA "
                         "once its parent did); use --launcher torchrun on a GPU host")
    env = _env()
    os.environ["DS_ACCELERATOR"] = env["DS_ACCELERATOR"]  # read once DeepSpeed is imported: before it is
    for module in WORKER_IMPORTS:
        importlib.import_module(module)
    port = _free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    ranks: dict[int, int] = {}
    with log_path.open("w") as log:
        for rank in range(max(nproc, 1)):
            pid = os.fork()
            if pid == 0:  # never returns
                launch = {} if nproc == 0 else dict(
                    RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                    GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                _forked(args, log.fileno(), {**env, **launch})
            ranks[pid] = rank
    deadline, stop, code = time.monotonic() + timeout_s, signal.SIGTERM, 0
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline:
                for other in ranks:
                    os.kill(other, stop)
                code = code or "timeout"
                stop, deadline = signal.SIGKILL, time.monotonic() + GRACE_S
            time.sleep(0.05)
            continue
        ranks.pop(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0 and code == 0:
            code, deadline = 1, min(deadline, time.monotonic() + GRACE_S)
    return code


def _export_cli(opts: BenchOptions, spec: ModelSpec, model_path: Path, strategy: str, adapter: str | None,
                work: Path) -> dict:
    """``lora-dist export RUN_DIR`` in its own launch, on a run dir holding lora_dist_fsdp2's adapter."""
    from lora_dist.config import config_to_dict, load_config

    if not adapter or not Path(adapter).is_dir():
        return {"error": "no adapter: lora_dist_fsdp2 did not finish"}
    root = work / "runs" / spec.name / f"export_cli_{strategy}"
    if root.exists():
        shutil.rmtree(root)
    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    cfg = load_config(None, [*_lora_overrides(opts, model_path, strategy), f"output.dir={run_dir}",
                             "export.dtype=float32", "export.max_shard_size=5GB"])
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    shutil.copytree(adapter, run_dir / "adapter")
    t0 = time.perf_counter()
    code = _launch(opts, ["export_run", str(run_dir), str(root / "merged"), str(root / "result")], root / "log.txt")
    record = {"strategy": strategy, "launch_wall_s": time.perf_counter() - t0, "exit_code": code}
    ranks = sorted((root / "result").glob("rank*.json"))
    if code != 0 or len(ranks) != opts.nproc:
        record["error"] = "\n".join((root / "log.txt").read_text(errors="replace").splitlines()[-25:])
        _log(f"{spec.name} lora-dist export ({strategy}): FAILED (exit {code}); log in {root / 'log.txt'}")
    else:
        record["ranks"] = [json.loads(p.read_text()) for p in ranks]
    for merged in root.glob("merged*"):
        shutil.rmtree(merged)
    return record


def _lora_overrides(opts: BenchOptions, model_path: Path, strategy: str) -> list[str]:
    """The lora_dist config every lora_dist measurement uses (as :class:`bench.systems.LoraDist`)."""
    return [f"model.path={model_path}", f"parallel.strategy={strategy}", f"lora.r={opts.lora_r}",
            f"lora.alpha={2.0 * opts.lora_r}", "lora.target_modules=all-linear",
            f"train.micro_batch_size={opts.micro_batch}", f"train.seq_len={opts.seq_len}"]


def _plain_copy(src: Path, dst: Path) -> float:
    """Copy the checkpoint's weight files through user space (read, write, fsync): the I/O floor of a merge."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with f.open("rb") as fin, (dst / f.name).open("wb") as fout:
            while chunk := fin.read(64 * 2**20):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    elapsed = time.perf_counter() - t0
    shutil.rmtree(dst)
    return elapsed


def _run_worker(args: list[str]) -> None:
    """``python -m lora_dist.bench.worker ARGS``, in this process: what torchrun runs in each rank."""
    sys.argv = ["lora_dist.bench.worker", *args]
    runpy.run_module("lora_dist.bench.worker", run_name="__main__", alter_sys=True)


def _release_free_heap() -> None:
    """Give the heap's free pages back (glibc's ``malloc_trim``). A forked process inherits its parent's: still
    resident, so in its RSS baseline, and reused without raising it, they would hide a phase's growth that a
    fresh process shows (measured: a tiny export's 10 MB above baseline read as 1.5 MB)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def _forked(args: list[str], log_fd: int, env: dict[str, str]) -> None:
    """A forked worker process: output to ``log_fd``, ``env`` as its whole environment, then the worker; exits
    with its code, never returns (its parent's interpreter state is not torn down twice)."""
    import traceback

    import torch

    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - whatever the parent's streams were
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # what a fresh process reads at import
        _release_free_heap()
        _run_worker(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what a crashed process prints
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _offline_merge(opts: BenchOptions, model_path: Path, adapter: Path, out: Path, work: Path) -> dict:
    """``lora-dist merge`` in a process of its own, timed without interpreter start-up."""
    result_path = work / "merge_result.json"
    result_path.unlink(missing_ok=True)
    args = ["merge", str(model_path), str(adapter), str(out), str(result_path)]
    log_path = work / "merge_log.txt"
    if opts.launcher == "fork":
        returncode = _fork_launch(args, log_path, 0, opts.timeout_s)
    else:
        with log_path.open("w") as log:
            returncode = subprocess.run([sys.executable, "-m", "lora_dist.bench.worker", *args], env=_env(),
                                        stdout=log, stderr=subprocess.STDOUT).returncode
    if out.exists():
        shutil.rmtree(out)
    output = log_path.read_text(errors="replace")[-3000:]
    if returncode != 0 or not result_path.is_file():
        return {"exit_code": returncode, "error": output}
    result = json.loads(result_path.read_text())
    if result["exit_code"] != 0:
        result["error"] = output
    result["above_baseline"] = result["peak_anon"] - result["baseline"]["RssAnon"]
    return result


def _merge_vs_copy(opts: BenchOptions, model_path: Path, adapter: str | None, work: Path) -> dict:
    if not adapter or not Path(adapter).is_dir():
        return {"error": "no adapter: lora_dist_fsdp2 did not finish"}
    merges, copies = [], []
    for _ in range(opts.copy_reps):  # alternate, so both see the same page-cache state
        copies.append(_plain_copy(model_path, work / "copy"))
        merges.append(_offline_merge(opts, model_path, Path(adapter), work / "merged", work))
    failed = [m for m in merges if m["exit_code"] != 0]
    if failed:
        return {"merge_runs": merges, "copy_s": copies, "error": failed[0].get("error", "")}
    weights = sum(f.stat().st_size for f in model_path.glob("*.safetensors"))
    return {"merge_runs": merges, "copy_s": copies, "merge_s": min(m["wall_s"] for m in merges),
            "copy_floor_s": min(copies), "merge_above_baseline": max(m["above_baseline"] for m in merges),
            "weight_bytes": weights}


def _plans(opts: BenchOptions, model_path: Path) -> dict:
    from lora_dist.config import load_config
    from lora_dist.plan import plan_memory

    plans = {}
    for strategy in ("fsdp2", "zero3", "ddp"):
        cfg = load_config(None, _lora_overrides(opts, model_path, strategy))
        plans[f"lora_dist_{strategy}"] = plan_memory(cfg, opts.nproc).as_dict()
    return plans


def _source_version() -> dict:
    """The commit, local changes, and a hash of the code measured (the lora_dist sources)."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + path.read_bytes())
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("status", "--porcelain", "--", ".").splitlines(),
            "sources_sha256": digest.hexdigest()[:16]}


def run_bench(opts: BenchOptions) -> dict:
    """Run every configuration on every size; write and return the results."""
    from lora_dist.bench import report
    from lora_dist.bench.measure import machine_info

    work = Path(opts.work_dir)
    out = Path(opts.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data_path = write_data(work / "data.jsonl")
    results: dict = {
        "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "source": _source_version(),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("out", "work_dir")},
        "anchor": ANCHOR, "sizes": [],
    }
    for spec in opts.specs():
        _log(f"{spec.name}: building/reusing checkpoint")
        model_path = build_checkpoint(spec, work / "models")
        size: dict = {"spec": asdict(spec), "num_params": spec.num_params(), "configs": {},
                      "plans": _plans(opts, model_path)}
        for config in opts.configs:
            _log(f"{spec.name} {config}: launching {opts.nproc} ranks")
            record = _run_config(opts, spec, model_path, data_path, config, work)
            size["configs"][config] = record
            if opts.profile and "ranks" in record:
                (out / "profiles").mkdir(exist_ok=True)
                profiles = [rank.pop("profile") for rank in record["ranks"]]
                (out / "profiles" / f"{spec.name}-{config}.txt").write_text(profiles[0]["table"] + "\n")
                record["self_times"] = profiles[0]["self_times"]  # rank 0's, as its table
            _log(f"{spec.name} {config}: {record['launch_wall_s']:.0f}s")
        size["export_cli"] = {}
        if "lora_dist_fsdp2" in opts.configs:  # the exports and the merge start from its adapter
            adapter = size["configs"]["lora_dist_fsdp2"].get("adapter_dir")
            for strategy in ("fsdp2",) if opts.quick else ("fsdp2", "zero3"):
                _log(f"{spec.name}: lora-dist export RUN_DIR ({strategy}), {opts.nproc} ranks")
                size["export_cli"][strategy] = _export_cli(opts, spec, model_path, strategy, adapter, work)
            _log(f"{spec.name}: offline merge vs plain copy")
            size["merge"] = _merge_vs_copy(opts, model_path, adapter, work)
        else:
            _log(f"{spec.name}: no export or merge measured (they start from lora_dist_fsdp2's adapter, "
                 "not in --configs)")
        results["sizes"].append(size)
    results["total_wall_s"] = time.perf_counter() - t_start
    if _source_version()["sources_sha256"] != results["source"]["sources_sha256"]:
        results["source_changed_during_run"] = _source_version()
        _log("warning: lora_dist/ or bench/ changed while the benchmark ran; the results mix versions")
    report.write_all(results, out)
    _log(f"done in {results['total_wall_s'] / 60:.1f} min; results in {out}")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchOptions()
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run in well under 3 minutes")
    p.add_argument("--out", default=None, help=f"results dir (default {d.out}; bench/results/tmp/quick with --quick)")
    p.add_argument("--work-dir", default=d.work_dir, help="checkpoints, data and run logs (default %(default)s)")
    p.add_argument("--sizes", nargs="*", default=[], help="model sizes by name (default: all of the mode)")
    p.add_argument("--configs", nargs="*", default=list(ORDER), choices=list(SYSTEMS), help="configurations to run")
    p.add_argument("--nproc", type=int, default=d.nproc, help="ranks per configuration (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {d.seq_len}; 64 with --quick)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per rank per step")
    p.add_argument("--timed-steps", type=int, default=None, help=f"timed steps (default {d.timed_steps}; 2 with --quick)")
    p.add_argument("--launcher", choices=("torchrun", "fork"), default=d.launcher,
                   help="how each configuration's ranks start: torchrun (default), or fork (CPU only): forked from "
                        "this process, which imports their libraries once, so a smoke run's launches are not "
                        "mostly imports")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step of each configuration (untimed): rank 0's top operators in "
                        "OUT/profiles/SIZE-CONFIG.txt")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    quick = bool(args.quick)
    return BenchOptions(
        out=args.out or str(RESULTS / ("tmp/quick" if quick else "")),
        work_dir=args.work_dir, quick=quick, sizes=tuple(args.sizes), configs=tuple(args.configs), nproc=args.nproc,
        seq_len=args.seq_len or (64 if quick else BenchOptions.seq_len), micro_batch=args.micro_batch,
        timed_steps=args.timed_steps or (2 if quick else BenchOptions.timed_steps),
        forward_reps=1 if quick else BenchOptions.forward_reps, copy_reps=1 if quick else BenchOptions.copy_reps,
        profile=args.profile, launcher=args.launcher,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    results = run_bench(options_from_args(args))
    from lora_dist.bench.report import failed_configs

    return 1 if failed_configs(results) else 0


if __name__ == "__main__":
    sys.exit(main())
