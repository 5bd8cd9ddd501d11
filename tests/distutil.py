"""Launching multi-process test runs on CPU (gloo) with torchrun, and comparing the adapters they write."""

from __future__ import annotations

import atexit
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


def _completed(cmd: list[str], proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _run(cmd: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group, all of which is killed on timeout (forked ranks included)."""
    with subprocess.Popen(cmd, cwd=REPO, env=quiet_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, preexec_fn=_no_core_files) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(popen.pid)
            out, err = popen.communicate()
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{_timed_out_output(out, err)}")
    return subprocess.CompletedProcess(cmd, popen.returncode, out, err)


def _no_core_files() -> None:  # in the forked child before exec: nothing to import there
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pid: int) -> None:
    """A timed-out run's process group ended: SIGABRT first, on which Python's faulthandler (PYTHONFAULTHANDLER,
    the zygote's) prints every thread's stack to the run's stderr, then SIGKILL."""
    import time

    try:
        os.killpg(pid, signal.SIGABRT)
        time.sleep(3)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _timed_out_output(out: str, err: str) -> str:
    """The output's ends, and the stacks faulthandler printed (:func:`_kill_group`) whatever followed them."""
    stacks = [part[:4000] for part in err.split("Fatal Python error: Aborted")[1:]]
    return "\n".join([out[-3000:], err[-3000:], *(f"stacks at the timeout:{s}" for s in stacks)])


def torchrun(nproc: int, *args: str, timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N ARGS`` on a free port; output captured. For tests of
    the launch itself; :func:`ranks` starts ranks faster where the launcher is not what is tested."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *args]
    return _completed(cmd, _run(cmd, timeout, env), check)


def ranks(nproc: int, *args: str, timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``nproc`` ranks of ``-m MODULE ARGS`` or ``SCRIPT ARGS`` as :func:`torchrun` would start them, forked from
    this test process's zygote (tests/dist_scripts/zygote.py): they see a launch by hand (RANK, WORLD_SIZE,
    MASTER_ADDR ...) and rendezvous for real, without importing torch and transformers again."""
    return _completed(["ranks", str(nproc), *args], _zygote().run(nproc, list(args), env, timeout), check)


def lora_dist(*args: str, timeout: float = 300, check: bool = True, process: bool = False,
              exact_env: dict[str, str] | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python -m lora_dist.cli ARGS`` as one process, forked from the zygote, or with ``process`` started
    afresh (for a variable read at import time). Its environment is this process's with ``env`` on top, or
    ``exact_env`` and nothing else (a test of what the launcher variables say)."""
    if process:
        cmd = [sys.executable, "-m", "lora_dist.cli", *args]
        return _completed(cmd, _run(cmd, timeout, env), check)
    return _completed(["lora-dist", *args], _zygote().run(0, ["-m", "lora_dist.cli", *args], env, timeout,
                                                          exact_env), check)


class _Zygote:
    """The client of tests/dist_scripts/zygote.py: one request at a time, a JSON line each way."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "dist_scripts" / "zygote.py")],
                                     cwd=REPO, env=quiet_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)

    def _read(self, timeout: float | None) -> dict | None:
        import json
        import select

        line = b""
        while not line.endswith(b"\n"):
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError(f"the test zygote exited ({self.proc.wait()})")
            line += chunk
        return json.loads(line)

    def run(self, nproc: int, target: list[str], env: dict[str, str], timeout: float,
            exact_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        import json
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"nproc": nproc, "port": free_port(), "target": target,
                       "env": quiet_env(**env) if exact_env is None else exact_env,
                       "cwd": str(REPO), "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            launcher = self._read(None)["pid"]
            reply = self._read(timeout)
            if reply is None:
                _kill_group(launcher)
                self._read(None)
                raise AssertionError(f"{target} timed out after {timeout} s:\n"
                                     f"{_timed_out_output(out.read_text(), err.read_text())}")
            return subprocess.CompletedProcess(target, reply["code"], out.read_text(), err.read_text())


_zygotes: dict[int, _Zygote] = {}


def _zygote() -> _Zygote:
    """This test process's zygote, started on first use; it ends when this process closes its stdin."""
    if os.getpid() not in _zygotes or _zygotes[os.getpid()].proc.poll() is not None:
        _zygotes[os.getpid()] = _Zygote()
    return _zygotes[os.getpid()]


def _end_zygotes() -> None:
    """At exit: close this process's zygote's pipes and wait for it (it exits when its stdin closes), so no zygote
    outlives the test run and none is reported still running."""
    zygote = _zygotes.pop(os.getpid(), None)
    if zygote is not None:
        zygote.proc.stdin.close()
        zygote.proc.stdout.close()
        try:
            zygote.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            zygote.proc.kill()
            zygote.proc.wait()


atexit.register(_end_zygotes)


#: What every fresh process of :func:`in_fresh_process` has imported before it starts.
FRESH_PRELOAD = ["torch", "torch.distributed.fsdp", "transformers", "transformers.models.llama.modeling_llama",
                 "lora_dist.model", "lora_dist.nf4", "lora_dist.plan", "lora_dist.session", "lora_dist.bench.measure"]


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new process with nothing alive from this one (live tensor bytes counted there are the
    call's), forked from a forkserver that imported :data:`FRESH_PRELOAD` once: a spawned process imported them
    again every time (about 7 s). ``fn`` is a module-level function; its arguments and result are pickled."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FRESH_PRELOAD)  # read when the forkserver starts, the first call of a process
    with context.Pool(1) as pool:
        return pool.apply(fn, args)


def alias_bomb() -> str:
    """A 373-byte "billion laughs" config value: 9 lists of 9 aliases, 9^9 strings once expanded."""
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "lora:\n  target_modules: [" + ", ".join(levels) + "]\n"
    text = "# an alias bomb" + " " * (372 - len(text) - 15) + "\n" + text
    assert len(text.encode()) == 373
    return text


def randomize_lora_B(model, seed: int = 0, scale: float = 1.0) -> None:
    """Every ``lora_B`` param (PEFT's or lora_dist's) drawn from N(0, scale²), so the adapter changes the output."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    """Two PEFT adapter dirs hold the same LoRA tensors: every element within ``atol``, with a margin (each
    tensor's root-mean-square difference at most a tenth of it), and they are trained (B moved off zero): not two
    untrained adapters.

    The margin is on the typical element, not the largest: a gradient element that cancels to near zero takes its
    size, even its sign, from the summation order, and Adam's normalization turns that into a visible move of that
    element alone (a lone lora_A element 0.64x ``atol`` off on an AMD EPYC host, every other within 0.01x). A defect
    (a missed sync, another batch) moves whole tensors by about lr per step."""
    import torch
    from safetensors.torch import load_file

    ta, tb = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    assert set(ta) == set(tb) and ta
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")
    rms = {k: float((tb[k].double() - ta[k].double()).square().mean().sqrt()) for k in ta}
    worst = max(rms, key=rms.get)
    assert rms[worst] <= atol / 10, (f"{worst}: root-mean-square diff {rms[worst]:.3g} is within 10x of the tolerance "
                                     f"{atol:.3g}: too close to call")
    assert max(float(t.abs().max()) for k, t in ta.items() if "lora_B" in k) > 1e-4


def assert_same_losses(got: list[float], want: list[float], atol: float = 1e-5) -> None:
    """Two runs logged the same losses (fp32 sums in another order: ``atol``), the largest difference at most half
    of it (a margin)."""
    assert len(got) == len(want) and want
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst <= atol / 2, f"losses {got} vs {want}: max |diff| {worst:.3g} against a tolerance of {atol:.3g}"


def assert_same_grad_norms(got: Path, want: Path, rtol: float = 1e-4) -> None:
    """Two runs' output dirs logged the same gradient norm at every step (relative ``rtol``, the largest difference at
    most half of it). The one check that sees a gradient off by a constant factor (a sum for a mean, a
    world size divided twice): the loss is computed before the gradient, and Adam's update hardly moves with its
    scale."""
    a, b = logged(got, "grad_norm"), logged(want, "grad_norm")
    assert len(a) == len(b) and b and all(x > 0 for x in b), (a, b)
    worst = max(abs(x - y) / y for x, y in zip(a, b))
    assert worst <= rtol / 2, f"grad norms {a} vs {b}: max relative diff {worst:.3g} against {rtol:.3g}"


def assert_same_run(got: Path, want: Path, atol: float, loss_atol: float = 1e-5) -> None:
    """Two ``lora-dist train`` output dirs trained alike: the same adapter (:func:`assert_same_adapter`, ``atol``),
    losses (:func:`assert_same_losses`, ``loss_atol``) and gradient norms (:func:`assert_same_grad_norms`)."""
    assert_same_adapter(got / "adapter", want / "adapter", atol)
    assert_same_losses(logged(got), logged(want), loss_atol)
    assert_same_grad_norms(got, want)


def adapter_atol(lr: float, steps: int) -> float:
    """The bound two runs' adapters must meet when their ranks (or kernels) sum gradients in another order: Adam
    normalizes each update by the gradient's own size, so a rounding difference in a tiny gradient moves an
    element by a visible fraction of lr; every element moves at most ~lr per step, lr x steps in all, and a real
    defect (a missed sync, a wrong scale) shows at that size. 1/300 of it, met with the margin of
    :func:`assert_same_adapter`, holds on every machine."""
    return lr * steps / 300


def short_run_args(base: Path, data: Path, steps: int, lr: float, targets: str = "[q_proj,v_proj,down_proj]",
                   *extra: str) -> list[str]:
    """The overrides of the tests' short comparison runs: ``steps`` steps of 32-token blocks, lr ``lr``, r=4 on
    ``targets``, no held-out data, no checkpoints."""
    return [f"model.path={base}", f"data.path={data}", f"train.steps={steps}", "train.seq_len=32", f"train.lr={lr}",
            "train.warmup_steps=1", "data.eval_fraction=0", "lora.r=4", f"lora.target_modules={targets}",
            "checkpoint.every=0", *extra]


def short_run_setup(base: Path, root: Path, steps: int, lr: float) -> dict:
    """``base`` (a tiny checkpoint), 200 demo records written under ``root`` and the :func:`short_run_args` of
    ``steps`` steps at ``lr``: ``{"base", "data", "root", "common"}``, what the comparison tests' fixtures hold."""
    from lora_dist.demo import write_demo_data

    data = write_demo_data(root / "data.jsonl", n=200)
    return {"base": base, "data": data, "root": root, "common": short_run_args(base, data, steps, lr)}


def logged(out: Path, key: str = "loss") -> list[float]:
    """``key`` of every line of a run's ``metrics.jsonl`` that has it, in order (the losses by default)."""
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def train_run(out: Path, nproc: int, *args: str) -> Path:
    """``lora-dist train ARGS output.dir=OUT`` as one process (``nproc`` 1) or on ``nproc`` ranks, forked by the zygote; returns ``out``."""
    args = ("train", *args, f"output.dir={out}")
    if nproc == 1:
        lora_dist(*args)
    else:
        ranks(nproc, "-m", "lora_dist.cli", *args)
    return out


def step_peak(engine, ids) -> int:
    """Peak live tensor bytes of one LoRA training step on ``ids`` (after a first step, so the AdamW state
    exists), as ``lora-dist bench`` measures them."""
    sys.path.insert(0, str(REPO))
    from lora_dist.bench.measure import LiveTensorBytes

    del sys.path[0]

    def step():
        engine.backward(engine.forward_loss_sum({"input_ids": ids}, ids))
        engine.step(1e-3)

    step()
    tracker = LiveTensorBytes("cpu")
    with tracker:
        step()
    return tracker.peak


def llama_config_dir(path: Path, vocab: int, hidden: int, intermediate: int, layers: int) -> Path:
    """``path`` holding a Llama ``config.json`` only (4 heads, 2 key/value heads, untied head): what the planner
    reads, and what the fake-world measurements build their model from."""
    import transformers as tf

    tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(path)
    return path
