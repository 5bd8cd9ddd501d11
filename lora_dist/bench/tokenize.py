"""``python -m bench tokenize``: data start-up time and peak RSS per rank, tokenize-once against the code before it.

The data: ``--records`` short generated records (half ``{"text"}``, half ``{"prompt", "completion"}``,
60-120 characters), the demo's byte-level BPE tokenizer saved as a model dir's tokenizer, ``seq_len``
128. Each measurement runs in a fresh process that imports the library, loads the tokenizer, then
times ``load_dataset`` alone:

* ``before``: the code of ``--baseline`` (a git ref, extracted with ``git archive``): every rank reads
  the file into Python records, tokenizes and packs it into in-memory tensors;
* ``cold``: this code with an empty cache: the rank that builds (one per job, or per node) tokenizes
  with ``--num-proc`` workers into the memory-mapped cache;
* ``warm``: this code with the cache built: every other rank, and every restart, maps it.

RSS is the process's peak resident set (``ru_maxrss``) above its level before the load; for ``cold``
the workers' peaks are reported as well (sampled every 50 ms). Results: ``bench/results/tokenize.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

#: The code before tokenize-once (issue 12 parts 3-4).
BASELINE = "2ee8da6"
REPO = Path(__file__).resolve().parents[2]

MEASURE = r"""
import json, resource, sys, threading, time
import psutil
from transformers import AutoTokenizer
from lora_dist.data import load_dataset
mode, data, tok_dir, cache, num_proc, out = sys.argv[1:7]
tok = AutoTokenizer.from_pretrained(tok_dir)
tok("warm up")
me = psutil.Process()
base = me.memory_info().rss
workers = {}
done = threading.Event()

def sample():
    while not done.is_set():
        for child in me.children(recursive=True):
            try:
                workers[child.pid] = max(workers.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if mode == "before":
    ds = load_dataset(data, tok, 128, verbose=False)
else:
    ds = load_dataset(data, tok, 128, verbose=False, cache_dir=cache, num_proc=int(num_proc))
seconds = time.perf_counter() - t0
done.set()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump({"mode": mode, "seconds": seconds, "rss_before": base, "rss_peak": peak, "rss_growth": peak - base,
           "rss_after": me.memory_info().rss, "worker_rss_peaks": sorted(workers.values()), "blocks": len(ds),
           "tokens": int(ds.stats.tokens)}, open(out, "w"))
"""


def write_records(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` short records, a line at a time."""
    rng = random.Random(seed)
    words = ("the red fox grey cat small robot builds paints counts wooden boats old maps silver keys near "
             "harbour garden morning quietly").split()
    with path.open("w") as f:
        for k in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(12, 22)))
            row = {"text": text} if k % 2 else {"prompt": text[:30], "completion": text[30:]}
            f.write(json.dumps(row) + "\n")
    return path


def _measure(mode: str, code_root: Path, work: Path, data: Path, tok_dir: Path, cache: Path, num_proc: int) -> dict:
    out = work / f"{mode}.json"
    env = dict(os.environ, PYTHONPATH=str(code_root), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", MEASURE, mode, str(data), str(tok_dir), str(cache), str(num_proc),
                           str(out)], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    print(f"{mode:>6}: {result['seconds']:8.1f} s, peak RSS +{result['rss_growth'] / 1e9:.2f} GB "
          f"(workers {[round(w / 1e9, 2) for w in result['worker_rss_peaks']]} GB), {result['blocks']} blocks",
          flush=True)
    return result


def run(records: int, num_proc: int, baseline: str, out: Path, work: Path) -> dict:
    from lora_dist.demo import make_tokenizer

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    old = work / "before"
    old.mkdir()
    archive = subprocess.run(["git", "archive", baseline, "lora_dist"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    tok_dir = work / "tokenizer"
    make_tokenizer().save_pretrained(tok_dir)
    t0 = time.perf_counter()
    data = write_records(work / "data.jsonl", records)
    print(f"{records} records, {data.stat().st_size / 1e6:.0f} MB, written in {time.perf_counter() - t0:.0f} s",
          flush=True)
    cache = work / "cache"
    results = {"records": records, "data_bytes": data.stat().st_size, "num_proc": num_proc, "baseline": baseline,
               "seq_len": 128, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "load_before": os.getloadavg()}}
    results["cold"] = _measure("cold", REPO, work, data, tok_dir, cache, num_proc)
    results["warm"] = _measure("warm", REPO, work, data, tok_dir, cache, num_proc)
    results["before"] = _measure("before", old, work, data, tok_dir, cache, num_proc)
    results["machine"]["load_after"] = os.getloadavg()
    results["identical_block_count"] = results["before"]["blocks"] == results["cold"]["blocks"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench tokenize", description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000, help="generated records (default %(default)s)")
    p.add_argument("--num-proc", type=int, default=2, help="tokenization workers of the cold build (default 2)")
    p.add_argument("--baseline", default=BASELINE, help="git ref of the code to compare with (default %(default)s)")
    p.add_argument("--out", default="bench/results/tokenize.json", help="result file (default %(default)s)")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lora_dist_bench_tokenize"))
    args = p.parse_args(argv)
    run(args.records, args.num_proc, args.baseline, Path(args.out), Path(args.work_dir))
    return 0
