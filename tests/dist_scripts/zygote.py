"""A process that has imported torch, transformers, DeepSpeed and lora_dist once, and forks the test suite's
runs from there: the suite's fast stand-in for ``python -m lora_dist.cli`` and ``torchrun --nproc_per_node N``.

Importing those libraries is most of a tiny run's CPU time (about 3 s of a 3.4 s one-process run on these
machines, and again in every rank). :mod:`distutil` starts one zygote per test process and sends it one JSON
line per run::

    {"nproc": N, "port": P, "target": ["-m", "lora_dist.cli", ...] or [SCRIPT, ...],
     "env": {...}, "cwd": DIR, "stdout": FILE, "stderr": FILE}

The zygote forks a launcher in a new session (so a timeout can kill all of it), which
- with ``nproc`` 0 runs the target itself: one plain process, no launch variables;
- otherwise forks ``nproc`` ranks with the variables of a launch by hand (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); they rendezvous through rank 0's
  store for real. Like torchrun its exit code is 0 when every rank succeeded and 1 otherwise; when one rank
  fails the others get 10 s to finish, then SIGTERM, then SIGKILL.

The zygote answers ``{"pid": launcher}`` at once and ``{"code": exit code}`` when the launcher ends. Every run
gets the request's environment, but modules imported here saw the zygote's: a test of a variable read at
import time starts a real process. torchrun itself (its agent store, restarts) is tested in ``tests/launch``
and ``tests/cluster``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback

GRACE_S = 10.0


def _preload() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import lora_dist.cli  # noqa: F401
    import lora_dist.session  # noqa: F401
    import lora_dist.train  # noqa: F401

    # What every run would otherwise do again, once per rank (measured on a 2-rank tiny run):
    with contextlib.suppress(ImportError):  # a zero* engine's optimizer check imports DeepSpeed's Muon module,
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  # whose torch.compile imports inductor: ~3 s
    with contextlib.suppress(ImportError):  # a model load's weight renamings: ~1000 regexes, built and cached once
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")
    # Everything imported so far lives as long as the runs: out of the collector's way, so a collection in a run
    # (DeepSpeed's engine calls gc.collect() twice, 0.7 s each over this heap) walks only the run's own objects.
    gc.freeze()


def _run_target(target: list[str]) -> int:
    """Run ``-m MODULE ARGS`` or ``SCRIPT ARGS`` as ``__main__`` in this process; its exit code."""
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
            runpy.run_path(target[0], run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what a crashed process prints
        traceback.print_exc()
        return 1


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _launch(target: list[str], nproc: int, port: int) -> int:
    """Fork ``nproc`` ranks of the target; wait for them like torchrun's agent."""
    ranks = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                              LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
            _exit(_run_target(target))
        ranks[pid] = rank
    failed, deadline, stop = False, None, signal.SIGTERM
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG if deadline else 0)
        if pid == 0:
            if time.monotonic() > deadline:
                for other in ranks:
                    os.kill(other, stop)
                stop, deadline = signal.SIGKILL, time.monotonic() + GRACE_S
            time.sleep(0.05)
            continue
        rank = ranks.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not failed:
            failed, deadline = True, time.monotonic() + GRACE_S
            print(f"zygote: rank {rank} exited with {code}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _launcher(request: dict) -> None:
    """The forked launcher: the request's session, output files, directory and environment; never returns."""
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        faulthandler.enable(all_threads=True)  # a timed-out run's SIGABRT prints where every thread was,
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # and writes no core file
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        target, nproc = request["target"], request["nproc"]
        code = _run_target(target) if nproc == 0 else _launch(target, nproc, request["port"])
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        _exit(code)


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _launcher(request)
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
