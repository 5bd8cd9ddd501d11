"""Checkpoint, resume (exactly, and on another world size / strategy), faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from distutil import REPO, assert_same_adapter, assert_same_run, free_port, lora_dist, quiet_env, ranks
from safetensors.torch import load_file

from lora_dist.demo import write_demo_data
from lora_dist.preemption import PREEMPT_EXIT_CODE, Preempted

STEPS = 6
LR = 5e-3
#: Another world size sums gradients in another order: the bound of tests/test_train_dist.py (docs/testing.md).
ADAPTER_ATOL = LR * STEPS / 300


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    root = tmp_path_factory.mktemp("ckpt")
    data = write_demo_data(root / "data.jsonl", n=200)
    common = [f"model.path={base}", f"data.path={data}", f"train.steps={STEPS}", "train.seq_len=32",
              f"train.lr={LR}", "train.warmup_steps=2", "data.eval_fraction=0", "lora.r=4",
              "lora.target_modules=[q_proj,v_proj]", "checkpoint.every=2"]
    return {"base": base, "data": data, "root": root, "common": common}


def _run(setup, out: Path, nproc: int, *overrides: str, check: bool = True, **env: str):
    args = ["train", *setup["common"], f"output.dir={out}", *overrides]
    if nproc == 1:
        return lora_dist(*args, check=check, **env)
    return ranks(nproc, "-m", "lora_dist.cli", *args, check=check, **env)


def _resumed(proc, step: int, out: Path) -> None:
    """The run resumed from its step-``step`` checkpoint, and logged only the steps after it (a rerun from step 0,
    which would end with the same adapter, logs them all again)."""
    assert f"step-{step:06d} at step {step}" in proc.stderr and "resumed from" in proc.stderr, proc.stderr[-2000:]
    logged = [m["step"] for m in _metrics(out) if "loss" in m]
    assert logged == sorted(set(logged)), logged  # no step logged twice


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same(a: Path, b: Path, atol: float) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")
    assert max(float(t.abs().max()) for k, t in ta.items() if "lora_B" in k) > 1e-4


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def _manager(setup, out: Path):
    """A single-process CheckpointManager for ``out``'s checkpoints, to call save() directly."""
    from lora_dist.checkpoint import CheckpointManager
    from lora_dist.config import load_config
    from lora_dist.launch import LaunchEnv

    cfg = load_config(None, [*setup["common"], f"output.dir={out}"])
    return CheckpointManager(out / "checkpoints", cfg, LaunchEnv("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0))


class _SaveOnlyEngine:
    """Just enough of an engine for save(): its state is the given LoRA tensors and no optimizer moments."""

    def __init__(self, lora: dict[str, torch.Tensor]) -> None:
        self.lora = lora

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"lora": self.lora, "optimizer": {}}


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup["root"] / "full"
    _run(setup, out, 1, "parallel.strategy=none", "train.micro_batch_size=4")
    return out


def test_checkpoint_layout_and_pruning(uninterrupted):
    ckpts = uninterrupted / "checkpoints"
    # every=2 over 6 steps: steps 2, 4 and the last, 6; keep=2.
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000004", "step-000006"]
    assert (ckpts / "latest").read_text().strip() == "step-000006"
    state = json.loads((ckpts / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and state["samples_consumed"] == 16
    assert len(state["base"]["sha256"]) == 64
    assert state["quantize"] == "" and state["train"] == {"steps": STEPS, "lr": LR, "warmup_steps": 2,
                                                          "min_lr_ratio": 0.1, "weight_decay": 0.0,
                                                          "max_grad_norm": 1.0}
    # The last checkpoint holds what the adapter holds (fp32 LoRA, by the model's names vs PEFT's).
    final = load_file(str(ckpts / "step-000006" / "lora.safetensors"))
    adapter = {k.removeprefix("base_model.model."): v for k, v in _adapter(uninterrupted).items()}
    assert set(final) == set(adapter) and all(torch.equal(final[k], adapter[k]) for k in final)
    # The blocks it trains on (200 demo records in 32-token blocks, no eval split) and the seed ordering them.
    assert set(state["data"]) == {"blocks", "seq_len", "sha256", "seed"} and state["data"]["seq_len"] == 32
    assert state["data"]["blocks"] >= 200 // 4 and len(state["data"]["sha256"]) == 64 and state["data"]["seed"] == 0
    names = set(load_file(str(ckpts / "step-000004" / "lora.safetensors")))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)  # the base is never written
    moments = load_file(str(ckpts / "step-000004" / "optimizer.safetensors"))
    assert {f"{n}.exp_avg" for n in names} | {f"{n}.exp_avg_sq" for n in names} == set(moments)


def test_exact_resume_single_process(setup, tmp_path):
    """Stopped at step 3 and resumed == uninterrupted, bit for bit (dropout on: its RNG is restored too)."""
    opts = ("parallel.strategy=none", "train.micro_batch_size=4", "lora.dropout=0.1")
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    _run(setup, ref, 1, *opts)
    _run(setup, out, 1, *opts, "train.run_steps=3")
    assert not (out / "adapter").exists() and (out / "checkpoints" / "step-000003").is_dir()
    _resumed(_run(setup, out, 1, *opts), 3, out)
    _assert_same(ref, out, atol=0)
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert losses == [m["loss"] for m in _metrics(ref) if "loss" in m]


@pytest.fixture(scope="module")
def stopped_at_3(setup):
    """``stopped_at_3(strategy, nproc, micro_batch) -> dir`` of a run stopped after step 3, made once per launch
    shape; each test resumes its own copy."""
    made: dict[tuple, Path] = {}

    def stopped(strategy: str, nproc: int, micro_batch: int) -> Path:
        if (strategy, nproc, micro_batch) not in made:
            out = setup["root"] / f"stopped-{strategy}x{nproc}"
            _run(setup, out, nproc, f"parallel.strategy={strategy}", f"train.micro_batch_size={micro_batch}",
                 "train.run_steps=3")
            made[strategy, nproc, micro_batch] = out
        return made[strategy, nproc, micro_batch]

    return stopped


@pytest.mark.dist
@pytest.mark.parametrize(
    "first, second",
    [
        (("fsdp2", 2, 2), ("none", 1, 4)),  # 2 ranks -> 1
        (("zero3", 2, 2), ("ddp", 2, 2)),  # zero3 -> ddp
        (("ddp", 2, 2), ("zero3", 2, 2)),  # ddp -> zero3
        (("fsdp2", 2, 2), ("zero3", 2, 2)),  # fsdp2 -> zero3
        (("zero3", 2, 2), ("fsdp2", 2, 2)),  # zero3 -> fsdp2
    ],  # 1 rank -> more, none -> fsdp2: test_resume_one_to_three_ranks
    ids=["fsdp2x2-to-nonex1", "zero3-to-ddp", "ddp-to-zero3", "fsdp2-to-zero3", "zero3-to-fsdp2"],
)
def test_resume_on_another_world_size_and_strategy(setup, uninterrupted, stopped_at_3, first, second):
    out = setup["root"] / f"elsewhere-{first[0]}-{second[0]}"
    shutil.copytree(stopped_at_3(*first), out, symlinks=True)
    s2, n2, mb2 = second
    _resumed(_run(setup, out, n2, f"parallel.strategy={s2}", f"train.micro_batch_size={mb2}"), 3, out)
    # Same global batch (4) throughout, so the result equals the uninterrupted single-process run.
    assert_same_run(out, uninterrupted, ADAPTER_ATOL)


@pytest.mark.dist
def test_resume_one_to_three_ranks(setup, tmp_path):
    ref = tmp_path / "ref3"
    _run(setup, ref, 1, "parallel.strategy=none", "train.micro_batch_size=3")
    out = tmp_path / "to3"
    _run(setup, out, 1, "parallel.strategy=none", "train.micro_batch_size=3", "train.run_steps=2")
    _resumed(_run(setup, out, 3, "parallel.strategy=fsdp2", "train.micro_batch_size=1"), 2, out)
    assert_same_run(out, ref, ADAPTER_ATOL)


def test_refuses_a_different_base_unless_forced(setup, tiny_checkpoint, tmp_path):
    out = tmp_path / "other-base"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    other = tiny_checkpoint("llama", hidden=64, layers=2, seed=7)
    proc = _run(setup, out, 1, "parallel.strategy=none", f"model.path={other}", check=False)
    assert proc.returncode == 2
    assert "checkpoint.force=true" in _last_line(proc)
    _run(setup, out, 1, "parallel.strategy=none", f"model.path={other}", "checkpoint.force=true")
    assert (out / "adapter").is_dir()


def test_resume_on_other_data_or_order_is_refused_unless_forced(setup, tmp_path):
    """A resume goes on at ``samples_consumed`` of the sample stream: on other blocks (another file, tokenizer,
    seq_len, eval split or token format) or another train.seed it would train on another stream, silently."""
    out = tmp_path / "other-data"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    ckpt = out / "checkpoints" / "step-000002"
    saved = json.loads((ckpt / "state.json").read_text())["data"]
    other = write_demo_data(tmp_path / "other.jsonl", n=120)
    for change, named in ((f"data.path={other}", "other data blocks"), ("data.eval_fraction=0.1", "other data blocks"),
                          ("train.seed=5", "train.seed=0, this run has train.seed=5")):
        proc = _run(setup, out, 1, "parallel.strategy=none", change, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = _last_line(proc)
        assert f"{ckpt} was trained with {named}" in last and "checkpoint.force=true" in last, last
        assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002"]  # nothing written
    proc = _run(setup, out, 1, "parallel.strategy=none", f"data.path={other}", check=False)
    assert f"({saved['blocks']} blocks of 32 tokens; this run has " in _last_line(proc)
    # Forced: it goes on, with a warning, and its checkpoints record the new blocks.
    proc = _run(setup, out, 1, "parallel.strategy=none", f"data.path={other}", "checkpoint.force=true",
                "train.run_steps=2")
    assert "checkpoint.force=true: " in proc.stderr and "resumed from" in proc.stderr
    now = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())["data"]
    assert now["sha256"] != saved["sha256"] and now["blocks"] < saved["blocks"]
    # A checkpoint that records no data (an older lora_dist's) resumes, saying so; then the same data resumes
    # without a word.
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    del state["data"]
    (out / "checkpoints" / "step-000004" / "state.json").write_text(json.dumps(state))
    proc = _run(setup, out, 1, "parallel.strategy=none", f"data.path={other}", "train.run_steps=1",
                "checkpoint.every=1")
    assert "records no data fingerprint" in proc.stderr and "step-000004 at step 4" in proc.stderr
    proc = _run(setup, out, 1, "parallel.strategy=none", f"data.path={other}")
    assert "step-000005 at step 5" in proc.stderr and (out / "adapter").is_dir()
    assert "checkpoint.force" not in proc.stderr and "records no data" not in proc.stderr


def test_resume_with_other_lora_settings_or_shapes_is_refused_naming_the_fix(setup, tiny_checkpoint, tmp_path):
    """Checked before any tensor is copied: a one-line error, not a RuntimeError from ``copy_``."""
    out = tmp_path / "reshaped"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    proc = _run(setup, out, 1, "parallel.strategy=none", "lora.r=8", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = _last_line(proc)
    assert "trained with lora.r=4, this run has lora.r=8; resume with lora.r=4 or start a fresh output.dir" in last
    narrower = tiny_checkpoint("llama", hidden=32, layers=2)  # same LoRA layers, other shapes
    proc = _run(setup, out, 1, "parallel.strategy=none", f"model.path={narrower}", "checkpoint.force=true", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = _last_line(proc)
    assert "lora_A.weight is [4, 64] in the checkpoint but [4, 32] in this model" in last and "fresh output.dir" in last


def test_resume_onto_another_quantization_of_the_base_is_refused_both_ways(setup, tmp_path):
    """A dense run resumed with model.quantize=nf4 trained on against another base without a word (the checkpoint
    recorded NF4 weights only for NF4 runs); now the setting is recorded and a change either way is refused."""
    pytest.importorskip("torchao")
    dense, nf4 = tmp_path / "dense", tmp_path / "nf4"
    _run(setup, dense, 1, "parallel.strategy=none", "train.run_steps=2")
    _run(setup, nf4, 1, "parallel.strategy=none", "train.run_steps=2", "model.quantize=nf4")
    for out, change, was in ((dense, "model.quantize=nf4", 'model.quantize="" (no quantization)'),
                             (nf4, "model.quantize=", "model.quantize=nf4")):
        proc = _run(setup, out, 1, "parallel.strategy=none", change, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = _last_line(proc)
        assert "step-000002 was trained with " + was in last and f"resume with {was}" in last, last
        assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002"]


def test_resume_with_another_schedule_goes_on_with_a_warning_naming_it(setup, tmp_path):
    """The LR at a step is a function of train.steps, lr, warmup_steps, min_lr_ratio: a resume with others goes on
    with them from the checkpoint's step, which used to happen without a word."""
    out = tmp_path / "schedule"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    proc = _run(setup, out, 1, "parallel.strategy=none", "train.steps=8", "train.lr=0.01", "train.run_steps=1",
                "train.micro_batch_size=3")
    assert ("step-000002 was trained with other settings: train.steps=6 -> 8, train.lr=0.005 -> 0.01, global batch "
            "2 -> 3 sequences a step (world size 1 x train.micro_batch_size=3 x train.grad_accum=1)") in proc.stderr
    proc = _run(setup, out, 1, "parallel.strategy=none", "train.steps=8", "train.lr=0.01", "train.micro_batch_size=3")
    assert "step-000003 at step 3" in proc.stderr and "other settings" not in proc.stderr


def test_the_last_step_is_checkpointed_so_a_longer_run_goes_on_from_it(setup, tmp_path):
    """The last step used to be written only as the adapter: with export.adapter=false (and no merged export) the run
    ended "done" with its last steps nowhere, and a run with a larger train.steps went back to the last periodic
    checkpoint and trained the finished steps again."""
    out = tmp_path / "extended"
    _run(setup, out, 1, "parallel.strategy=none", "export.adapter=false")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:06d}" and not (out / "adapter").exists()
    proc = _run(setup, out, 1, "parallel.strategy=none", f"train.steps={STEPS + 2}")
    assert f"step-{STEPS:06d} at step {STEPS}" in proc.stderr, proc.stderr[-2000:]
    assert [m["step"] for m in _metrics(out) if "loss" in m] == list(range(1, STEPS + 3))  # none trained twice


def test_a_rerun_with_fewer_steps_than_its_checkpoint_is_refused_and_touches_nothing(setup, tmp_path):
    """Resuming a run past the new train.steps used to exit 0 having trained nothing: it rewrote the adapter (the
    checkpoint's weights) and recorded train.steps=N in config.json, printing "done: loss nan -> nan". Now one line,
    exit 2, nothing written. A rerun of the finished run with its own train.steps says it has nothing to train."""
    out = tmp_path / "finished"
    _run(setup, out, 1, "parallel.strategy=none")
    files = {p: p.read_bytes() for p in [out / "config.json", *sorted((out / "adapter").iterdir())]}
    proc = _run(setup, out, 1, "parallel.strategy=none", f"train.steps={STEPS - 2}", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"at step {STEPS}, past train.steps={STEPS - 2}: nothing to train" in last and "train.steps above" in last
    assert {p: p.read_bytes() for p in files} == files
    proc = _run(setup, out, 1, "parallel.strategy=none")
    assert f"done: the run had trained all {STEPS} steps, nothing more to train" in proc.stdout
    assert "nan" not in proc.stdout


def test_a_restart_resumes_the_runs_latest_not_the_dir_named_again(setup, tmp_path):
    """torchrun --max-restarts (and a Slurm requeue) start the workers again with the same arguments: an explicit
    checkpoint.resume=DIR used to take the run back to DIR and its first save deleted the run's newer checkpoints.
    A restart now resumes the run's latest once the run saved checkpoints going on from DIR; the first start, and a
    restart before it saved any (also after a rollback within the run), resume DIR."""
    seed, out = tmp_path / "seed", tmp_path / "restarted"
    _run(setup, seed, 1, "parallel.strategy=none", "train.run_steps=2")
    named = f"checkpoint.resume={seed / 'checkpoints' / 'step-000002'}"
    proc = _run(setup, out, 1, "parallel.strategy=none", named, "train.run_steps=2", TORCHELASTIC_RESTART_COUNT="1")
    assert "step-000002 at step 2" in proc.stderr and "not checkpoint.resume" not in proc.stderr  # none of its own yet
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    proc = _run(setup, out, 1, "parallel.strategy=none", named, "train.run_steps=1", TORCHELASTIC_RESTART_COUNT="2")
    assert "torchrun restart 2" in proc.stderr and "step-000004 at step 4" in proc.stderr, proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000005"
    # A rollback within the run (resume its own step 4) restarted before it saved: still step 4, not latest (5)
    rollback = f"checkpoint.resume={out / 'checkpoints' / 'step-000004'}"
    proc = _run(setup, out, 1, "parallel.strategy=none", rollback, "train.run_steps=1", TORCHELASTIC_RESTART_COUNT="3")
    assert "step-000004 at step 4" in proc.stderr and "torchrun restart" not in proc.stderr, proc.stderr[-2000:]
    proc = _run(setup, out, 1, "parallel.strategy=none", named, "train.run_steps=1")  # a first start: DIR, as named
    assert "step-000002 at step 2" in proc.stderr


def test_a_restart_of_a_never_run_goes_on_from_its_own_checkpoints(setup, tmp_path):
    """checkpoint.resume=never holds for a job's first start: its restart (torchrun --max-restarts, a Slurm requeue,
    the same arguments again) resumes the checkpoints that job saved, which it used to refuse as "an earlier run's"
    (the job died with the steps since lost). A restart of another launch is still refused: a first start refused
    over an earlier launch's checkpoints (torchrun restarts it) must not resume them, also within one Slurm
    allocation (its job id is every launch's there: a torchrun restart is told by its own invocation). So is a
    restart whose launch lora_dist cannot name, with the fix."""
    from lora_dist.launch.detect import launch_identity

    out, job, other = tmp_path / "never", "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", "11111111-2222-4333-8444-555555555555"
    never = ("parallel.strategy=none", "checkpoint.resume=never")
    _run(setup, out, 1, *never, "train.run_steps=2", TORCHELASTIC_RUN_ID=job)
    proc = _run(setup, out, 1, *never, "train.run_steps=1", TORCHELASTIC_RUN_ID=job, TORCHELASTIC_RESTART_COUNT="1")
    assert "torchrun restart 1 (TORCHELASTIC_RESTART_COUNT): resuming this job's latest checkpoint" in proc.stderr
    _resumed(proc, 2, out)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["job"] == {"torchrun": job}
    another = "holds checkpoints another launch saved (step-000002, step-000003), not this one's, at a"
    for env, message in (({"TORCHELASTIC_RUN_ID": other}, "already holds checkpoints of an earlier run"),
                         ({"TORCHELASTIC_RUN_ID": other, "TORCHELASTIC_RESTART_COUNT": "1"}, another),
                         ({"TORCHELASTIC_RUN_ID": other, "TORCHELASTIC_RESTART_COUNT": "1", "SLURM_JOB_ID": "500"},
                          another),
                         ({"TORCHELASTIC_RESTART_COUNT": "1"},
                          "launch with checkpoint.resume=auto (the default) to go on from them on a restart")):
        proc = _run(setup, out, 1, *never, check=False, **env)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert launch_identity({"SLURM_JOB_ID": "812", "TORCHELASTIC_RUN_ID": job}) == {"slurm": "812", "torchrun": job}
    agent = launch_identity({"TORCHELASTIC_RUN_ID": "none"})["torchrun"]  # not --standalone: the agent process
    assert agent.endswith(f":{os.getppid()}@" + agent.rsplit("@", 1)[1]) and launch_identity({}) == {}


def test_export_of_a_run_takes_its_newest_weights_and_names_an_unreadable_checkpoint(setup, tmp_path):
    """``lora-dist export RUN_DIR`` took the adapter whenever there was one: after a longer run resumed from the
    finished one and stopped, it exported the older weights. And an unreadable latest checkpoint ended in a
    safetensors traceback (exit 1) once the model was built; now one line, exit 2, naming the fix."""
    from lora_dist.merge import LoRAWeights, merge_weight

    out = tmp_path / "longer"
    _run(setup, out, 1, "parallel.strategy=none")  # the adapter at step 6, and the checkpoint of step 6
    # The adapter holds the newest weights: the checkpoint beside it is not read (a damaged one does not matter).
    moments = out / "checkpoints" / f"step-{STEPS:06d}" / "optimizer.safetensors"
    kept = moments.read_bytes()
    moments.write_bytes(kept[:100])
    # A run dir an earlier lora_dist wrote with an fsdp2-only key beside another strategy (cpu_offload under
    # zero2 was accepted, and ignored): exported, the key dropped, not refused as that config is refused now.
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "parallel": {**config["parallel"], "strategy": "zero2",
                                                                        "cpu_offload": True}}))
    lora_dist("export", str(out), "--out", str(tmp_path / "from-adapter"), "--dtype", "float32")
    moments.write_bytes(kept)
    _run(setup, out, 1, "parallel.strategy=none", f"train.steps={STEPS + 2}", "train.run_steps=1")  # stopped at 7
    proc = lora_dist("export", str(out), "--out", str(tmp_path / "merged"), "--dtype", "float32")
    assert f"step-{STEPS + 1:06d} holds step {STEPS + 1}, later than the run's adapter (step {STEPS}" in proc.stderr
    lora = load_file(str(out / "checkpoints" / f"step-{STEPS + 1:06d}" / "lora.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(setup["base"] / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj"
    expected = merge_weight(base[f"{name}.weight"], LoRAWeights(lora[f"{name}.lora_A.weight"],
                                                                lora[f"{name}.lora_B.weight"], 16 / 4))
    torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    assert not torch.equal(expected, base[f"{name}.weight"])
    broken = out / "checkpoints" / f"step-{STEPS + 1:06d}" / "lora.safetensors"
    broken.write_bytes(broken.read_bytes()[:300])
    proc = lora_dist("export", str(out), "--out", str(tmp_path / "merged2"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = _last_line(proc)
    assert str(broken.parent) in last and "point " in last and "checkpoints/latest at an earlier step" in last, last
    assert not (tmp_path / "merged2").exists()


def test_failed_rerun_keeps_the_runs_config_json(setup, tmp_path):
    out = tmp_path / "rerun"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    config = (out / "config.json").read_text()
    for bad in (f"model.path={tmp_path / 'missing'}", "lora.r=8"):  # fails validation; fails resume
        assert _run(setup, out, 1, "parallel.strategy=none", bad, check=False).returncode == 2
        assert (out / "config.json").read_text() == config
    assert not list(out.glob(".config.json*"))


def test_corrupt_latest_checkpoint_falls_back_to_previous(setup, tmp_path):
    out = tmp_path / "corrupt"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=4", "checkpoint.keep=3")
    latest = out / "checkpoints" / "step-000004" / "lora.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    proc = _run(setup, out, 1, "parallel.strategy=none")
    assert "skipping corrupt checkpoint" in proc.stderr and "step-000004" in proc.stderr
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    steps = [m["step"] for m in _metrics(out) if "loss" in m]
    # Steps 3-4 are redone from the step-2 checkpoint; their first rows were dropped at the resume (issue 15).
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000006"  # the last step's


SKEWED_VIEW = """
import os, sys
from pathlib import Path
import lora_dist.checkpoint as checkpoint
from lora_dist.cli import main

mode = sys.argv[1]
if os.environ["RANK"] == "1":  # rank 1's node sees the checkpoints dir otherwise
    if mode == "stale":  # a stale directory cache: not the newest checkpoint
        real = checkpoint.CheckpointManager._step_dirs
        checkpoint.CheckpointManager._step_dirs = lambda self: real(self)[:-1]
        checkpoint.CheckpointManager._latest_name = lambda self: "step-000002"
    else:  # cannot read it at all
        def unreadable(path):
            raise checkpoint.ResumeError(f"{path} is unreadable (OSError: stale file handle)")
        checkpoint.read_checkpoint = unreadable
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.dist
def test_every_rank_resumes_the_checkpoint_rank_0_chose(setup, uninterrupted, tmp_path):
    """Rank 0 chooses; a rank whose node sees an older directory listing resumes at the same step (before,
    it resumed from its own newest: ranks at different steps), and one that cannot read the choice stops
    every rank in one line."""
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_VIEW)
    out = tmp_path / "skewed"
    _run(setup, out, 1, "parallel.strategy=none", "train.micro_batch_size=4", "train.run_steps=4")
    args = ["train", *setup["common"], f"output.dir={out}", "parallel.strategy=ddp", "train.micro_batch_size=2"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, symlinks=True)
    proc = ranks(2, str(script), "stale", *args)
    assert "resumed from" in proc.stderr and "step-000004" in proc.stderr
    assert [m["step"] for m in _metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]  # nothing redone
    assert_same_adapter(uninterrupted / "adapter", out / "adapter", ADAPTER_ATOL)
    proc = ranks(2, str(script), "unreadable", *args[:-3], f"output.dir={broken}", *args[-2:], check=False)
    assert proc.returncode != 0
    assert "every rank must see" in proc.stderr and "stale file handle" in proc.stderr


def test_explicitly_named_corrupt_checkpoint_is_an_error(setup, tmp_path):
    out = tmp_path / "named"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    ckpt = out / "checkpoints" / "step-000002"
    (ckpt / "state.json").write_text("{not json")
    proc = _run(setup, out, 1, "parallel.strategy=none", f"checkpoint.resume={ckpt}", check=False)
    assert proc.returncode == 2
    last = _last_line(proc)
    assert "step-000002 is unreadable" in last and "Traceback" not in proc.stderr


def test_crash_while_writing_a_checkpoint_keeps_the_previous(setup, tmp_path, monkeypatch, close_fails):
    """A write error reported only at the file's close (NFS) fails the save: nothing short is published."""
    out = tmp_path / "crash"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    failed = close_fails()
    with pytest.raises(OSError, match="Input/output error"):
        _manager(setup, out).save(4, _SaveOnlyEngine({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)}))
    assert failed == ["lora.safetensors"]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002"]  # no temp dir left behind
    monkeypatch.undo()
    (ckpts / ".step-000003.tmp-0dead123").mkdir()  # what a writer killed mid-save (SIGKILL) leaves
    (ckpts / ".unrelated").mkdir()
    proc = _run(setup, out, 1, "parallel.strategy=none")
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert sorted(p.name for p in ckpts.glob(".*")) == [".unrelated"]  # the next save pruned the killed writer's dir


def test_a_prune_cut_short_leaves_nothing_that_stops_a_resume(setup, tmp_path, monkeypatch):
    """Pruning step-2 was killed after its state.json was gone (rmtree's order is the filesystem's; a kill after a
    preemption save, or a file NFS keeps busy): the dir it was deleting must not be a step-N dir the requeued run's
    resume=auto stops at ("no readable state.json"). It is renamed aside first, and the next run removes it."""
    from lora_dist import checkpoint as ckpt_mod

    out = tmp_path / "cut-prune"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2", "checkpoint.every=1")
    ckpts = out / "checkpoints"
    assert _names(ckpts) == ["latest", "step-000001", "step-000002"]

    def killed(path, ignore_errors=False):  # deletes state.json, then the process dies
        (Path(path) / "state.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed)
    engine = _SaveOnlyEngine({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)})
    with pytest.raises(KeyboardInterrupt):
        _manager(setup, out).save(3, engine)  # keep=2: step-1 is pruned
    monkeypatch.undo()
    assert (ckpts / "latest").read_text().strip() == "step-000003"
    names = _names(ckpts)
    assert "step-000001" not in names and any(n.startswith(".step-000001.del-") for n in names), names
    shutil.rmtree(ckpts / "step-000003")  # the stand-in engine's checkpoint (one tensor): resume the real step 2
    (ckpts / "latest").write_text("step-000002\n")
    proc = _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=4", "checkpoint.every=1")
    assert "resumed from" in proc.stderr and "step-000002 at step 2" in proc.stderr
    assert not [n for n in _names(ckpts) if n.startswith(".")]  # the cut-short deletion is gone


def _foreign_checkpoint(path: Path, run_id: str | None) -> Path:
    """A ``step-N`` dir lora_dist did not write for this run: another run's (``run_id``) or unknown (None)."""
    path.mkdir(parents=True)
    if run_id is None:
        (path / "mine.txt").write_text("the user's own\n")
    else:
        step = int(path.name.split("-")[1])
        (path / "state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    return path


def _names(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.iterdir())


def test_pruning_goes_by_step_never_by_name_and_only_this_runs(setup, tmp_path):
    """Issue 15 item 5: pruning by name deleted the newest checkpoint. Here ``step-1000000`` sorts before
    ``step-999999`` by name; another run's dir and a dir of the user's files are never touched."""
    out = tmp_path / "prune"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    ckpts = out / "checkpoints"
    other = _foreign_checkpoint(ckpts / "step-000001", "0123456789abcdef")
    mine = _foreign_checkpoint(ckpts / "step-000003", None)
    manager = _manager(setup, out)  # checkpoint.keep=2
    engine = _SaveOnlyEngine({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)})
    for step in (999_998, 999_999, 1_000_000):
        manager.save(step, engine)
        assert (ckpts / "latest").read_text().strip() == f"step-{step:06d}"
    assert _names(ckpts) == ["latest", "step-000001", "step-000003", "step-1000000", "step-999999"]
    assert (mine / "mine.txt").is_file()
    assert json.loads((other / "state.json").read_text())["run_id"] == "0123456789abcdef"
    run_id = json.loads((out / ".lora_dist_run.json").read_text())["run_id"]
    assert json.loads((ckpts / "step-1000000" / "state.json").read_text())["run_id"] == run_id


def test_a_save_after_a_rollback_removes_this_runs_later_checkpoints(setup, tmp_path):
    """Resumed from step 2, the run's step-4 and step-6 are from before the rollback: the next save removes them,
    so a later fallback can never resume them; ``latest`` names the new checkpoint."""
    out = tmp_path / "rollback"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    manager = _manager(setup, out)
    manager.cfg.checkpoint.keep = 5
    engine = _SaveOnlyEngine({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)})
    for step in (4, 6):
        manager.save(step, engine)
    manager.save(3, engine)
    ckpts = out / "checkpoints"
    assert _names(ckpts) == ["latest", "step-000002", "step-000003"]
    assert (ckpts / "latest").read_text().strip() == "step-000003"


def test_a_save_never_replaces_another_runs_checkpoint_of_the_same_step(setup, tmp_path):
    from lora_dist.outputs import OutputError

    out = tmp_path / "collide"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")
    ckpts = out / "checkpoints"
    other = _foreign_checkpoint(ckpts / "step-000004", "0123456789abcdef")
    mine = _foreign_checkpoint(ckpts / "step-000006", None)
    engine = _SaveOnlyEngine({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)})
    with pytest.raises(OutputError, match="step-000004 belongs to another run"):
        _manager(setup, out).save(4, engine)
    with pytest.raises(OutputError, match="step-000006 has no readable state.json"):
        _manager(setup, out).save(6, engine)
    assert _names(ckpts) == ["latest", "step-000002", "step-000004", "step-000006"]
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    assert (mine / "mine.txt").is_file() and json.loads((other / "state.json").read_text())["step"] == 4


def test_disk_full_while_saving_is_one_line_naming_what_is_intact(setup, tmp_path, monkeypatch):
    from lora_dist import checkpoint as ckpt_mod
    from lora_dist.outputs import OutputDirError

    out = tmp_path / "full"
    _run(setup, out, 1, "parallel.strategy=none", "train.run_steps=2")

    def full(*args, **kwargs):
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_mod, "write_safetensors", full)
    engine = _SaveOnlyEngine({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)})
    with pytest.raises(OutputDirError) as failed:
        _manager(setup, out).save(4, engine)
    assert str(failed.value).startswith(f"cannot write checkpoint step-000004 in {out / 'checkpoints'} (no space left")
    assert str(failed.value).endswith("the previous checkpoint step-000002 and latest are intact")
    assert _names(out / "checkpoints") == ["latest", "step-000002"]


def test_nan_loss_stops_naming_the_step_and_saves_nothing_corrupt(setup, tmp_path, monkeypatch):
    """The loss turns NaN at step 3 (injected): training stops before that update, names the step,
    and every checkpoint on disk predates it and is finite; no adapter is written."""
    import lora_dist.train as train_mod
    from lora_dist.config import load_config
    from lora_dist.launch import destroy_distributed
    from lora_dist.parallel import Engine

    real, calls = Engine.loss_sum, []

    def poisoned(self, batch):
        calls.append(1)
        loss = real(self, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(Engine, "loss_sum", poisoned)
    out = tmp_path / "nan"
    cfg = load_config(None, [*setup["common"], f"output.dir={out}", "parallel.strategy=none", "checkpoint.every=1"])
    try:
        with pytest.raises(train_mod.TrainingDiverged, match="loss is nan at step 3"):
            train_mod.train(cfg)
    finally:
        destroy_distributed()
    assert not (out / "adapter").exists()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved == ["step-000001", "step-000002"]
    for name in saved:
        tensors = load_file(str(out / "checkpoints" / name / "lora.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_non_finite_grad_norm_stops_naming_the_step_and_latest_stays_good(setup, tmp_path, monkeypatch):
    """The gradient turns Inf at step 3 with a finite loss (injected): training stops naming the step and
    ``latest`` still names the finite step-2 checkpoint. save() itself refuses non-finite LoRA tensors,
    writing and pruning nothing."""
    import lora_dist.train as train_mod
    from lora_dist import checkpoint as ckpt_mod
    from lora_dist.config import load_config
    from lora_dist.launch import destroy_distributed
    from lora_dist.parallel import Engine

    real, calls = Engine.loss_sum, []

    def poisoned(self, batch):
        calls.append(1)
        loss = real(self, batch)
        if len(calls) == 3:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    monkeypatch.setattr(Engine, "loss_sum", poisoned)
    out = tmp_path / "nan-grad"
    cfg = load_config(None, [*setup["common"], f"output.dir={out}", "parallel.strategy=none", "checkpoint.every=1"])
    try:
        with pytest.raises(train_mod.TrainingDiverged, match=r"grad norm is (nan|inf) at step 3"):
            train_mod.train(cfg)
    finally:
        destroy_distributed()
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000001", "step-000002"]
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    tensors = load_file(str(ckpts / "step-000002" / "lora.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())

    poisoned_lora = {**tensors, "model.layers.0.self_attn.q_proj.lora_B.weight": torch.full((64, 4), float("nan"))}
    with pytest.raises(ckpt_mod.TrainingDiverged, match="q_proj.lora_B.weight is not finite at step 3"):
        _manager(setup, out).save(3, _SaveOnlyEngine(poisoned_lora))
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000001", "step-000002"]
    assert (ckpts / "latest").read_text().strip() == "step-000002"


@pytest.mark.dist
def test_rank_killed_mid_run_restarts_from_last_checkpoint(setup, tmp_path):
    """SIGKILL one rank under ``torchrun --max-restarts 1``: the job restarts and resumes."""
    out = tmp_path / "killed"
    steps = 40
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--max-restarts=1", "-m", "lora_dist.cli", "train", *setup["common"], f"output.dir={out}",
           "parallel.strategy=fsdp2", "train.micro_batch_size=2", f"train.steps={steps}", "checkpoint.every=4"]
    agent = subprocess.Popen(cmd, cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and agent.poll() is None:
        if (out / "checkpoints" / "step-000008").is_dir():
            workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "lora_dist.cli" in " ".join(p.cmdline())]
            if len(workers) == 2:
                killed = workers[-1].pid
                workers[-1].send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    output, _ = agent.communicate(timeout=300)
    assert killed is not None, "training finished before a rank could be killed:\n" + output[-3000:]
    assert agent.returncode == 0, output[-5000:]
    assert "resumed from" in output
    resumed_at = int(output.split("resumed from")[1].split("at step ")[1].split()[0])
    assert resumed_at >= 8
    steps_logged = [m["step"] for m in _metrics(out) if "loss" in m]
    assert steps_logged[-1] == steps and (out / "adapter" / "adapter_model.safetensors").is_file()


def _start_and_signal(setup, out: Path, sig: signal.Signals, *overrides: str) -> subprocess.CompletedProcess:
    """Run one training process, send ``sig`` once step 3 is logged, wait for it to end."""
    cmd = [sys.executable, "-m", "lora_dist.cli", "train", *setup["common"], f"output.dir={out}",
           "parallel.strategy=none", "train.steps=400", "checkpoint.every=0", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_preemption_signal_checkpoints_and_exits_for_requeue(setup, tmp_path, sig):
    out = tmp_path / "preempted"
    proc = _start_and_signal(setup, out, sig)
    assert proc.returncode == 99, proc.stderr[-2000:]  # PREEMPT_EXIT_CODE: the sbatch script requeues on it
    assert "preempted: checkpoint at step" in proc.stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert 3 <= stopped_at < 400 and not (out / "adapter").exists()
    resumed = _run(setup, out, 1, "parallel.strategy=none", f"train.steps={stopped_at + 2}", "checkpoint.every=0")
    assert f"at step {stopped_at}" in resumed.stderr and (out / "adapter").is_dir()


def test_sigusr2_checkpoints_on_demand_and_keeps_training(setup, tmp_path):
    out = tmp_path / "usr2"
    proc = _start_and_signal(setup, out, signal.SIGUSR2, "train.steps=40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")]
    assert len(saved) == 1 and 3 <= saved[0] < 40  # checkpoint.every=0: only the requested one
    assert (out / "adapter").is_dir()


def _train_until_preempted(cfg, on_usr1) -> Preempted:
    """``train(cfg)`` in this process, SIGUSR1 handled by ``on_usr1`` outside the run's own handler; what stopped it."""
    import lora_dist.train as train_mod
    from lora_dist.launch import destroy_distributed

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        with pytest.raises(Preempted) as stopped:
            train_mod.train(cfg)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        destroy_distributed()
    return stopped.value


def test_preemption_signal_during_model_load_stops_at_the_first_step(setup, tmp_path, monkeypatch):
    """SIGUSR1 while the model loads is not fatal: the run checkpoints at step 1 and exits for requeue."""
    import lora_dist.session as session_mod
    from lora_dist.config import load_config

    real = session_mod.load_model

    def preempted_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    monkeypatch.setattr(session_mod, "load_model", preempted_while_loading)
    out = tmp_path / "preempted-loading"
    cfg = load_config(None, [*setup["common"], f"output.dir={out}", "parallel.strategy=none"])
    stopped = _train_until_preempted(cfg, signal.SIG_IGN)  # were no handler installed yet: lost, not fatal to pytest
    assert stopped.step == 1 and stopped.code == PREEMPT_EXIT_CODE
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000001"


@pytest.mark.parametrize("when", ["during-a-save"])
def test_a_stop_signal_during_a_save_is_not_lost(setup, tmp_path, monkeypatch, when):
    """SIGUSR1 during a periodic save was acted on only after one more step and save, which Slurm's KillWait may
    cut short; now the run stops right after the save it came in."""
    import lora_dist.checkpoint as checkpoint_mod
    import lora_dist.train as train_mod
    from lora_dist.config import load_config

    if when == "tokenizing":
        real = train_mod.load_splits

        def load_splits(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)
            return real(*args, **kwargs)

        monkeypatch.setattr(train_mod, "load_splits", load_splits)
    else:
        real = checkpoint_mod.CheckpointManager.save

        def save(self, step, engine):
            real(self, step, engine)
            if step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

        monkeypatch.setattr(checkpoint_mod.CheckpointManager, "save", save)
    out = tmp_path / when
    cfg = load_config(None, [*setup["common"], f"output.dir={out}", "parallel.strategy=none"])  # every=2

    def fatal(signum, frame):  # outside the run's handler the signal kills the process (its default action)
        raise SystemExit(f"killed by signal {signum}")

    stopped = _train_until_preempted(cfg, fatal)
    step = 2
    assert stopped.step == step and stopped.code == PREEMPT_EXIT_CODE
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    assert [m["step"] for m in _metrics(out) if "loss" in m][-1] == step


def test_a_stop_signal_while_tokenizing_exits_at_once_for_a_requeue(setup, tmp_path, monkeypatch):
    """SIGUSR1 (Slurm's warning before the time limit) while the data was tokenized killed the rank (exit 138),
    which no sbatch script requeues. Before training there is nothing to save: the rank exits at once with the
    requeue code, leaving neither a token cache entry nor output.dir; the rerun trains."""
    import lora_dist.token_cache as token_cache
    from lora_dist.config import load_config

    real_read, real_chunk = token_cache.read_chunks, token_cache._tokenize_chunk
    monkeypatch.setattr(token_cache, "read_chunks", lambda source: real_read(source, 16))
    calls = []

    def tokenize(task):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_chunk(task)

    monkeypatch.setattr(token_cache, "_tokenize_chunk", tokenize)
    out, cache = tmp_path / "run", tmp_path / "cache"
    cfg = load_config(None, [*setup["common"], f"output.dir={out}", "parallel.strategy=none", "data.num_proc=1",
                             f"data.cache_dir={cache}"])

    def fatal(signum, frame):  # outside the run's handlers the signal kills the process (its default action)
        raise SystemExit(f"killed by signal {signum}")

    stopped = _train_until_preempted(cfg, fatal)
    assert stopped.step == 0 and stopped.code == PREEMPT_EXIT_CODE and stopped.before_training
    assert len(calls) == 3  # at once: no chunk after the signal's
    assert not out.exists() and (not cache.exists() or list(cache.iterdir()) == [])
    _run(setup, out, 1, "parallel.strategy=none", f"data.cache_dir={cache}")
    assert [m["step"] for m in _metrics(out) if "loss" in m][-1] == STEPS


HELD_SIGNAL = """
import os, signal, sys
import lora_dist.preemption as preemption
hold = preemption.hold_stop_signals

def hold_and_signal():  # the CLI's first step, then the signal, before anything loads torch
    hold()
    print("torch loaded" if "torch" in sys.modules else "torch not loaded", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

preemption.hold_stop_signals = hold_and_signal
from lora_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_signal_in_a_processs_first_seconds_exits_for_a_requeue(setup, tmp_path):
    """A stop signal while `lora-dist train` imports torch and transformers (its first ~3 s) took its default action,
    exit 143, no requeue: the CLI now holds it from its first step (the package imports nothing heavy) and hands it
    to the run's handlers, which end the rank for a requeue before any work."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", HELD_SIGNAL, "train", *setup["common"], f"output.dir={out}",
                           "parallel.strategy=none"], cwd=REPO, env=quiet_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == PREEMPT_EXIT_CODE, proc.stderr[-2000:]
    assert "torch not loaded" in proc.stderr and "SIGTERM before training started" in proc.stderr
    assert not out.exists()


def test_a_hold_no_run_takes_over_gives_the_signal_back(monkeypatch):
    """A command that ends before training (a bad config) releases the hold: the handlers it found are back, and a
    signal held meanwhile reaches them."""
    from lora_dist.preemption import hold_stop_signals, release_stop_signals

    got = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        hold_stop_signals()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == []  # held
        release_stop_signals()
        assert got == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) is not None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [signal.SIGUSR1] * 2  # the handler found, in place again
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _stopped_while_rank0_tokenizes(setup, tmp_path, stop_ranks: str) -> tuple[list, dict, dict, list]:
    """Two `lora-dist train` processes of tests/dist_scripts/stop_while_tokenizing.py, ``stop_ranks`` signalled:
    their exit codes, when each exited and was signalled, and the end of their stderr."""
    from distutil import REPO, free_port, quiet_env

    out = tmp_path / "flags"
    out.mkdir()
    port = str(free_port())
    args = [sys.executable, str(REPO / "tests" / "dist_scripts" / "stop_while_tokenizing.py"), str(out),
            *setup["common"], f"output.dir={tmp_path / 'run'}", "parallel.strategy=ddp",
            f"data.cache_dir={tmp_path / 'cache'}"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=quiet_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, STOP_RANKS=stop_ranks))
             for r in range(2)]
    exited: dict[int, float] = {}
    deadline = time.time() + 180
    while len(exited) < 2 and time.time() < deadline:
        for r, proc in enumerate(procs):
            if r not in exited and proc.poll() is not None:
                exited[r] = time.time()
        time.sleep(0.05)
    for proc in procs:
        proc.kill()
    errors = [proc.stderr.read()[-2000:] for proc in procs]
    signalled = {r: float((out / f"rank{r}-signalled").read_text()) for r in range(2)
                 if (out / f"rank{r}-signalled").exists()}
    return [proc.wait() for proc in procs], exited, signalled, errors


@pytest.mark.dist
def test_two_ranks_stopped_while_rank0_tokenizes_both_exit_for_a_requeue(setup, tmp_path):
    """Rank 1 waits for rank 0's token cache build in a collective, where a signal's handler could not run until
    rank 0 was done (or a day had passed): the wait polls now. Two `lora-dist train` processes: rank 1, signalled
    first, exits with the requeue code within seconds while rank 0 builds on; rank 0 when its own signal comes,
    10 chunks into a build of 13."""
    codes, exited, signalled, errors = _stopped_while_rank0_tokenizes(setup, tmp_path, "0,1")
    assert codes == [PREEMPT_EXIT_CODE] * 2, errors
    assert all(exited[r] - signalled[r] < 3 for r in range(2)), (exited, signalled)
    assert exited[1] < signalled[0], (exited, signalled)  # rank 1 did not wait for rank 0
    assert "SIGUSR1 before training started: nothing to save yet; exiting with 99 to be requeued" in errors[1]
    assert not (tmp_path / "run").exists()


@pytest.mark.dist
@pytest.mark.parametrize("alone", [0, 1])
def test_one_rank_alone_stopped_while_rank0_tokenizes_stops_the_other(setup, tmp_path, alone):
    """Only one rank is signalled (a `kill` of one process; a launcher that signals one rank). Rank 0, 10 chunks into
    its build: rank 1, waiting for that build, was left to a collective whose peer is gone (an error, exit 1, which
    no sbatch script requeues); it now learns that rank 0 was stopped. Rank 1, while it waits: rank 0 finishes the
    build, finds rank 1 gone, and reads in the store that it stopped. Either way both exit with the requeue code."""
    codes, exited, signalled, errors = _stopped_while_rank0_tokenizes(setup, tmp_path, str(alone))
    assert codes == [PREEMPT_EXIT_CODE] * 2, errors
    assert list(signalled) == [alone]
    other = 1 - alone
    assert exited[alone] - signalled[alone] < 3, (exited, signalled)
    assert exited[other] - signalled[alone] < (3 if alone == 0 else 10), (exited, signalled)  # rank 0 builds on
    assert f"rank {alone} was stopped before training: nothing to save yet; exiting with 99 to be requeued" in \
        errors[other]
    assert not (tmp_path / "run").exists()
    assert alone == 1 or not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_stop_exits_hands_over_to_training_and_stays_out_of_a_resume_from_a_dir():
    """The same handlers from a run's start through training: a stop signal between the two phases is not left to
    its default action (the handlers were restored, then installed again). A run from checkpoint.resume=DIR keeps
    the default action until training: its requeue would resume the job's own (not yet written) checkpoint instead
    of DIR, starting afresh. SIGUSR2, a checkpoint on demand, is ignored before training in both."""
    from lora_dist.preemption import stop_exits

    def mine(signum, frame):
        pass

    signals = (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)
    previous = {s: signal.signal(s, mine) for s in signals}
    try:
        with stop_exits() as handler:
            ours = [signal.getsignal(s) for s in signals]
            assert mine not in ours
            os.kill(os.getpid(), signal.SIGUSR2)  # ignored: nothing to save
            handler.training()
            assert [signal.getsignal(s) for s in signals] == ours
            os.kill(os.getpid(), signal.SIGUSR1)  # now a request for the next step boundary
            assert handler.poll() == (True, False)
        assert all(signal.getsignal(s) is mine for s in signals)
        with stop_exits(requeue=False) as handler:
            assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) is mine
            assert signal.getsignal(signal.SIGUSR2) is not mine
            os.kill(os.getpid(), signal.SIGUSR2)
            handler.training()
            assert mine not in [signal.getsignal(s) for s in signals]
            assert handler.poll() == (False, False)
        assert all(signal.getsignal(s) is mine for s in signals)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_second_stop_signal_leaves_the_first_ones_cleanup_alone():
    """Slurm may follow SIGUSR1 with SIGTERM: raised again inside the first stop's cleanup (a lock released, workers
    ended, the handlers restored), the second one cut that cleanup short."""
    from lora_dist.preemption import Preempted, stop_exits

    cleaned = []
    with stop_exits():
        with pytest.raises(Preempted):
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                cleaned.append(True)
    assert cleaned == [True]


def test_a_stop_right_after_the_run_dir_is_locked_releases_the_lock(setup, tmp_path, monkeypatch):
    """A stop signal between taking output.dir's lock and the training loop: the lock was released only from inside
    the loop, so a rerun in the same process (a notebook, a sweep) found the dir "in use by another run"."""
    import lora_dist.preemption as preemption_mod
    from lora_dist.config import load_config
    from lora_dist.outputs import RunLock

    real = preemption_mod.PreemptionHandler.training

    def training(self):
        os.kill(os.getpid(), signal.SIGUSR1)  # still before training: the rank ends at once
        real(self)

    monkeypatch.setattr(preemption_mod.PreemptionHandler, "training", training)
    out = tmp_path / "run"
    cfg = load_config(None, [*setup["common"], f"output.dir={out}", "parallel.strategy=none"])

    def fatal(signum, frame):
        raise SystemExit(f"killed by signal {signum}")

    stopped = _train_until_preempted(cfg, fatal)
    assert stopped.before_training and stopped.code == PREEMPT_EXIT_CODE
    RunLock(out).acquire().release()  # not held: this process's own leaked fd would refuse it
    monkeypatch.setattr(preemption_mod.PreemptionHandler, "training", real)
    _run(setup, out, 1, "parallel.strategy=none")
    assert [m["step"] for m in _metrics(out) if "loss" in m][-1] == STEPS


@pytest.mark.parametrize("when", ["final-eval", "adapter-write"])
def test_a_stop_signal_after_the_last_step_loses_nothing(setup, tmp_path, monkeypatch, when):
    """SIGUSR1 (Slurm's warning before preemption) after the last step. During the final eval it used to go unread:
    the handler was gone by the adapter write, the process died, with no requeue code and, at checkpoint.every=0, no
    checkpoint: the whole run lost. Now the run checkpoints its last step and exits for requeue, and the rerun writes
    the outputs; a signal during the adapter write waits for the write, and the run ends complete."""
    import lora_dist.parallel.engine as engine_mod
    import lora_dist.train as train_mod
    from lora_dist.config import load_config
    from lora_dist.launch import destroy_distributed

    def signalled(real):
        def run(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)
            return real(*args, **kwargs)
        return run

    if when == "final-eval":
        monkeypatch.setattr(train_mod, "_eval", signalled(train_mod._eval))
    else:
        monkeypatch.setattr(engine_mod.Engine, "save_adapter", signalled(engine_mod.Engine.save_adapter))
    out = tmp_path / when
    overrides = [*setup["common"], f"output.dir={out}", "parallel.strategy=none", "train.steps=3",
                 "checkpoint.every=0", "data.eval_fraction=0.1", "train.eval_every=0"]
    cfg = load_config(None, overrides)

    def fatal(signum, frame):  # outside the run's handler the signal kills the process (its default action)
        raise SystemExit(f"killed by signal {signum}")

    previous = signal.signal(signal.SIGUSR1, fatal)
    try:
        if when == "final-eval":
            with pytest.raises(Preempted) as stopped:
                train_mod.train(cfg)
            assert stopped.value.step == 3 and stopped.value.code == PREEMPT_EXIT_CODE
            assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
            assert not (out / "adapter").exists()
        else:
            train_mod.train(cfg)
            assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
        destroy_distributed()
    assert (out / "adapter").is_dir() or when == "final-eval"
    if when == "final-eval":  # the requeued run: resumes at the last step, trains nothing, writes the outputs
        monkeypatch.undo()
        proc = _run(setup, out, 1, *overrides[len(setup["common"]) + 1:])
        assert "step-000003 at step 3" in proc.stderr and (out / "adapter" / "adapter_model.safetensors").is_file()
        assert [m["step"] for m in _metrics(out) if "loss" in m] == [1, 2, 3]  # no step trained again
        assert [m["step"] for m in _metrics(out) if "eval_loss" in m] == [3]  # evaluated twice, logged once


def test_save_state_refuses_a_dir_holding_anything_but_a_checkpoint(tmp_path):
    """``save_state`` publishes by replacing the whole dir: a folder of the user's own files is refused, every file
    kept (it used to be swapped out and removed)."""
    from lora_dist.checkpoint import save_state
    from lora_dist.config import load_config
    from lora_dist.outputs import OutputError

    class Engine:
        def state_dict(self):
            return {"lora": {"a": torch.zeros(2)}, "optimizer": {"a.exp_avg": torch.zeros(2)}}

    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "thesis_notes.txt").write_text("mine")
    (results / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(OutputError, match="refusing to write a checkpoint to .*results: it holds sub and 1 more"):
        save_state(results, 5, Engine(), load_config(None, []), 10)
    assert (results / "thesis_notes.txt").read_text() == "mine" and (results / "sub" / "data.csv").is_file()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        save_state(a_file, 5, Engine(), load_config(None, []), 10)
    assert a_file.read_text() == "x"
