"""Launching multi-process test runs on CPU (gloo) with torchrun, and comparing the adapters they write."""

from __future__ import annotations

import os
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
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def torchrun(nproc: int, *args: str, timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N ARGS`` on a free port; output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def lora_dist(*args: str, timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``python -m lora_dist.cli ARGS`` as one process."""
    cmd = [sys.executable, "-m", "lora_dist.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def alias_bomb() -> str:
    """A 373-byte "billion laughs" config value: 9 lists of 9 aliases, 9^9 strings once expanded."""
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "lora:\n  target_modules: [" + ", ".join(levels) + "]\n"
    text = "# an alias bomb" + " " * (372 - len(text) - 15) + "\n" + text
    assert len(text.encode()) == 373
    return text


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    """Two PEFT adapter dirs hold the same LoRA tensors within ``atol``, with a margin (the largest difference
    at most half of it), and they are trained (B moved off zero): not two untrained adapters."""
    import torch
    from safetensors.torch import load_file

    ta, tb = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    assert set(ta) == set(tb) and ta
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")
    worst = max(float((tb[k].double() - ta[k].double()).abs().max()) for k in ta)
    assert worst <= atol / 2, f"max |diff| {worst:.3g} is within 2x of the tolerance {atol:.3g}: too close to call"
    assert max(float(t.abs().max()) for k, t in ta.items() if "lora_B" in k) > 1e-4


def train_run(out: Path, nproc: int, *args: str) -> Path:
    """``lora-dist train ARGS output.dir=OUT`` as one process (``nproc`` 1) or under torchrun; returns ``out``."""
    args = ("train", *args, f"output.dir={out}")
    if nproc == 1:
        lora_dist(*args)
    else:
        torchrun(nproc, "-m", "lora_dist.cli", *args)
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
