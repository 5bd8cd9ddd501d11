"""One rank of ``lora-dist train`` stopped by SIGUSR1 while rank 0 tokenizes (13 chunks of 16 rows, 0.3 s each):
rank 1 half a second after rank 0 started, while it waits for rank 0's build; rank 0 at its 10th chunk. Each rank
writes the time of its signal to ``OUT/rank<N>-signalled``; the exit code is the CLI's.

argv: OUT OVERRIDES...; ``STOP_RANKS`` (default ``0,1``): the ranks signalled.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import lora_dist.token_cache as token_cache
from lora_dist.cli import main

out, overrides = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
stopped = rank in {int(r) for r in os.environ.get("STOP_RANKS", "0,1").split(",")}
started = out / "rank0-started"
real_read, real_chunk = token_cache.read_chunks, token_cache._tokenize_chunk
token_cache.read_chunks = lambda source: real_read(source, 16)
calls = []


def signal_self() -> None:
    (out / f"rank{rank}-signalled").write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGUSR1)


def slow_tokenize(task):
    calls.append(1)
    if len(calls) == 1:
        started.write_text(str(time.time()))
    if len(calls) == 10 and stopped:
        signal_self()
    time.sleep(0.3)
    return real_chunk(task)


def signal_when_rank0_started() -> None:
    while not started.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    signal_self()


if rank == 0:
    token_cache._tokenize_chunk = slow_tokenize
elif stopped:
    threading.Thread(target=signal_when_rank0_started, daemon=True).start()
sys.exit(main(["train", *overrides, "data.num_proc=1"]))
