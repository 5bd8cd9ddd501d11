"""One rank of a run stopped by SIGUSR1 while rank 0 tokenizes: rank 1 half a second after rank 0 started, while it
waits for rank 0's build, rank 0 at its 10th chunk (about 3 s in). Each rank writes ``{"code", "signalled",
"exited"}`` (its exit code, and the seconds from rank 0's first chunk to its signal and to its exit) to
``OUT/rank<N>.json``.

argv: OUT CACHE_DIR OVERRIDES...
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lora_dist.token_cache as token_cache
from lora_dist.config import load_config
from lora_dist.train import train

out, cache, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rank = int(os.environ["RANK"])
started = out / "rank0-started"
real_read, real_chunk = token_cache.read_chunks, token_cache._tokenize_chunk
token_cache.read_chunks = lambda source: real_read(source, 16)
calls = []


signalled = []


def slow_tokenize(task):  # rank 0: 13 chunks of 0.3 s, signalled at the 10th
    calls.append(1)
    if len(calls) == 1:
        started.write_text(str(time.time()))
    if len(calls) == 10:
        signalled.append(time.time())
        os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.3)
    return real_chunk(task)


def signal_when_rank0_started():  # rank 1, waiting for rank 0's build meanwhile
    while not started.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    signalled.append(time.time())
    os.kill(os.getpid(), signal.SIGUSR1)


if rank == 0:
    token_cache._tokenize_chunk = slow_tokenize
else:
    threading.Thread(target=signal_when_rank0_started, daemon=True).start()
code = 0
try:
    train(load_config(None, [*overrides, f"data.cache_dir={cache}", "data.num_proc=1"]))
except SystemExit as e:
    code = e.code
t0 = float(started.read_text())
(out / f"rank{rank}.json").write_text(json.dumps({"code": code, "signalled": signalled[0] - t0 if signalled else None,
                                                  "exited": time.time() - t0}))
