"""`lora-dist train` writes only into its own run dir, and never loses or mixes anything (issue 15).

Each test runs the real CLI on a tiny model; the issue's exact inputs are regression cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distutil import REPO, lora_dist, quiet_env
from lora_dist.demo import write_demo_data
from lora_dist.outputs import RUN_MARKER, read_run_marker


@pytest.fixture(scope="module")
def good(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    data = write_demo_data(root / "data.jsonl", n=100)
    return {"root": root, "base": Path(base), "data": data}


def _args(good, out: Path, *overrides: str) -> list[str]:
    return ["train", f"model.path={good['base']}", f"data.path={good['data']}", f"output.dir={out}",
            "parallel.strategy=none", "train.steps=2", "train.seq_len=32", "lora.r=4", *overrides]


def _train(good, out: Path, *overrides: str, check: bool = False, **env: str) -> subprocess.CompletedProcess:
    return lora_dist(*_args(good, out, *overrides), check=check, **env)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lora-dist train: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _hashes(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a file's sha256, ``dir`` or ``link``, and its mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(root))] = f"{kind} {oct(p.lstat().st_mode)}"
    return out


def _metrics(out: Path) -> list[dict]:
    def strict(name):
        raise ValueError(f"{name} in metrics.jsonl")

    return [json.loads(line, parse_constant=strict) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _copy_base(good, dst: Path) -> Path:
    shutil.copytree(good["base"], dst)
    return dst


# ----------------------------------------------------------------------------- outputs that are inputs


def test_output_dir_equal_to_the_model_dir_is_refused_and_the_model_is_byte_identical(good, tmp_path):
    """Issue 15 item 1: `lora-dist train CFG model.path=M output.dir=M` overwrote M's config.json."""
    model = _copy_base(good, tmp_path / "M")
    before = _hashes(model)
    proc = _train(good, model, f"model.path={model}")
    _one_line_error(proc, f"output.dir '{model}' is the input '{model}'", "choose a output.dir outside every input")
    assert _hashes(model) == before


@pytest.mark.parametrize("where", ["inside", "symlink"])
def test_output_dir_inside_the_model_dir_is_refused(good, tmp_path, where):
    model = _copy_base(good, tmp_path / "M")
    before = _hashes(model)
    if where == "inside":
        out, needle = model / "run", "is inside the input"
    else:
        out, needle = tmp_path / "link", "is the input"
        out.symlink_to(model)
    _one_line_error(_train(good, out, f"model.path={model}"), needle)
    assert _hashes(model) == before and not (model / "run").exists()


@pytest.mark.parametrize("relation", ["is", "contains"])
def test_output_dir_equal_to_or_containing_the_data_file_is_refused(good, tmp_path, relation):
    data = tmp_path / "d" / "data.jsonl"
    data.parent.mkdir()
    shutil.copy(good["data"], data)
    before = _hashes(data.parent)
    out = data if relation == "is" else data.parent
    _one_line_error(_train(good, out, f"data.path={data}"), f"{relation} the input '{data}'")
    assert _hashes(data.parent) == before


# ----------------------------------------------------------------------------- someone else's dir


def test_a_folder_of_the_users_own_files_is_refused_before_any_work(good, tmp_path):
    """Issue 15 item 2: with export.merged=true checkpoint.every=1, adapter/important.txt and
    checkpoints/step-000002/mine.txt were deleted and config.json overwritten."""
    mine = tmp_path / "mine"
    for name in ("adapter/important.txt", "checkpoints/step-000002/mine.txt", "config.json"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(f"the user's own {name}\n")
    before = _hashes(mine)
    proc = _train(good, mine, "export.merged=true", "checkpoint.every=1")
    _one_line_error(proc, "holds files lora_dist did not write", "choose a new or empty output.dir")
    assert _hashes(mine) == before
    assert "trainable params" not in proc.stderr  # refused before the model was loaded


def test_failed_validation_leaves_no_output_dir(good, tmp_path):
    """Issue 15 item 11: an empty output.dir was left behind."""
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"oops": 1}\n')
    for bad in (f"model.path={tmp_path / 'missing'}", f"data.path={bad_data}", "train.seq_len=100000"):
        out = tmp_path / "never"
        assert _train(good, out, bad).returncode == 2
        assert not out.exists(), bad


@pytest.mark.parametrize("set_aside", [False, True], ids=["merged", "merged-set-aside-by-a-killed-overwrite"])
def test_existing_merged_without_overwrite_is_refused_before_training(good, tmp_path, set_aside):
    """Also where a killed ``output.overwrite`` export left the previous ``merged/`` set aside (``.merged.old-*``,
    between its two renames): it is put back first, then refused, before training (it used to be refused only at
    the end, after the whole run)."""
    out = tmp_path / "run"
    assert _train(good, out, "export.merged=true").returncode == 0
    if set_aside:
        (out / "merged").rename(out / ".merged.old-deadbeef")
    before = _hashes(out)
    proc = _train(good, out, "export.merged=true", "train.steps=3")
    _one_line_error(proc, f"{out / 'merged'} already exists", "output.overwrite=true")
    assert "trainable params" not in proc.stderr
    after = _hashes(out)
    after.pop(".lora_dist_run.lock")  # the lock file records the last holder's pid
    before.pop(".lora_dist_run.lock")
    if set_aside:  # put back where it was, byte for byte
        before = {k.replace(".merged.old-deadbeef", "merged", 1): v for k, v in before.items()}
    assert after == before


def test_a_fresh_run_over_a_finished_runs_adapter_is_refused_before_training(good, tmp_path):
    """A finished run without checkpoints (``checkpoint.every=0``, the default) run again into its dir: the new run
    would rewrite config.json and metrics.jsonl at its start and the adapter only at its end, so a failure between
    left the old adapter beside the new config. Refused, nothing changed; ``output.overwrite=true`` trains it again."""
    out = tmp_path / "run"
    assert _train(good, out).returncode == 0
    before = _hashes(out)
    proc = _train(good, out, "train.steps=3")
    _one_line_error(proc, "holds the adapter of an earlier run", "output.overwrite=true", "choose a new output.dir")
    assert "step 1/" not in proc.stderr
    after = _hashes(out)
    after.pop(".lora_dist_run.lock")
    before.pop(".lora_dist_run.lock")
    assert after == before
    assert _train(good, out, "train.steps=3", "output.overwrite=true").returncode == 0
    assert [row["step"] for row in _metrics(out) if "loss" in row][-1] == 3


def test_an_adapter_dir_holding_other_files_is_refused_before_training(good, tmp_path):
    """The adapter writer replaces the whole ``adapter/`` and refuses one that holds other files (a README for the
    Hub): refused before training, not after the whole run (which then had nothing saved)."""
    out = tmp_path / "run"
    assert _train(good, out).returncode == 0
    (out / "adapter" / "README.md").write_text("my notes")
    proc = _train(good, out, "train.steps=3", "output.overwrite=true")
    _one_line_error(proc, "refusing to write the adapter", "README.md", "choose a new or empty dir")
    assert "step 1/" not in proc.stderr
    assert (out / "adapter" / "README.md").read_text() == "my notes"


def test_two_runs_into_one_dir_at_once(good, tmp_path):
    out = tmp_path / "busy"
    cmd = [sys.executable, "-m", "lora_dist.cli", *_args(good, out, "train.steps=2000", "checkpoint.every=0")]
    first = subprocess.Popen(cmd, cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        second = _train(good, out, "train.steps=3")
        _one_line_error(second, "is in use by another lora-dist run", f"pid {first.pid} on",
                        "choose another output.dir")
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)  # preemption: checkpoint, exit 99
        first.communicate(timeout=120)
    assert first.returncode == 99
    assert _train(good, out, "train.steps=2000", "train.run_steps=1").returncode == 0  # the lock is free again


# ----------------------------------------------------------------------------- checkpoints belong to a run


def _run_a(good, out: Path) -> None:
    """An older run that stopped at step 7 (lr 5e-3), checkpoints 5-7."""
    proc = _train(good, out, "train.steps=10", "train.run_steps=7", "checkpoint.every=1", "checkpoint.keep=3",
                  "train.lr=5e-3", check=True)
    assert proc.returncode == 0


def test_a_fresh_run_over_an_older_runs_checkpoints_is_refused(good, tmp_path):
    """Issue 15 item 5: resume=never pruned its own new step-000004 (pruning by name), left `latest` pointing
    at nothing, and the next run silently resumed the other run's step-000007 (another lr)."""
    out = tmp_path / "run"
    _run_a(good, out)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000005", "step-000006", "step-000007"]
    before = _hashes(out)
    proc = _train(good, out, "checkpoint.resume=never", "train.steps=10", "checkpoint.every=1", "train.lr=1e-3")
    _one_line_error(proc, "already holds checkpoints of an earlier run", "step-000007",
                    "checkpoint.resume=auto", "choose a new output.dir")
    after = _hashes(out)
    after.pop(".lora_dist_run.lock")
    before.pop(".lora_dist_run.lock")
    assert after == before  # nothing pruned, latest and metrics untouched


def test_auto_never_resumes_another_runs_checkpoint(good, tmp_path):
    """Another run's step-000007 among this run's checkpoints, `latest` missing: refused, never resumed."""
    other = tmp_path / "other"
    _run_a(good, other)
    out = tmp_path / "run"
    assert _train(good, out, "train.steps=10", "train.run_steps=4", "checkpoint.every=2").returncode == 0
    ckpts = out / "checkpoints"
    shutil.copytree(other / "checkpoints" / "step-000007", ckpts / "step-000007")
    (ckpts / "latest").unlink()
    before = _hashes(out)
    proc = _train(good, out, "train.steps=10", "checkpoint.every=2")
    last = _one_line_error(proc, "step-000007 belongs to another run", "never resumed, pruned or replaced",
                           f"checkpoint.resume={ckpts / 'step-000007'}")
    assert read_run_marker(other)["run_id"] in last and read_run_marker(out)["run_id"] in last
    assert "resumed from" not in proc.stderr
    after = _hashes(out)
    after.pop(".lora_dist_run.lock")
    before.pop(".lora_dist_run.lock")
    assert after == before
    # Named explicitly, another run's checkpoint is resumed (the user asked for it); ours carry our run id.
    _train(good, out, "train.steps=10", "checkpoint.every=0", "train.run_steps=1",
           f"checkpoint.resume={other / 'checkpoints' / 'step-000007'}", check=True)


def test_state_json_records_the_run_id_and_pruning_keeps_this_runs_newest_by_step(good, tmp_path):
    out = tmp_path / "run"
    _train(good, out, "train.steps=6", "checkpoint.every=1", "checkpoint.keep=2", check=True)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000005", "step-000006"]
    run_id = read_run_marker(out)["run_id"]
    assert {json.loads((p / "state.json").read_text())["run_id"] for p in ckpts.glob("step-*")} == {run_id}
    assert (ckpts / "latest").read_text().strip() == "step-000006"


def test_a_broken_latest_falls_back_within_the_run_and_latest_is_repaired(good, tmp_path):
    """And metrics.jsonl gets no duplicate rows for the steps redone (issue 15 item 11)."""
    out = tmp_path / "run"
    _train(good, out, "train.steps=6", "train.run_steps=3", "checkpoint.every=2", "checkpoint.keep=5", check=True)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000003"
    shutil.rmtree(ckpts / "step-000003")  # latest now names a missing dir
    proc = _train(good, out, "train.steps=6", "train.run_steps=1", "checkpoint.every=2", "checkpoint.keep=5",
                  check=True)
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert (ckpts / "latest").read_text().strip() == "step-000003"
    (ckpts / "latest").write_text("step-000009\n")  # names nothing
    proc = _train(good, out, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5", check=True)
    assert "resumed from" in proc.stderr and "step-000003" in proc.stderr
    steps = [m["step"] for m in _metrics(out) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_metrics_rows_after_the_resumed_step_and_torn_lines_are_dropped(good, tmp_path):
    out = tmp_path / "run"
    _train(good, out, "train.steps=5", "train.run_steps=2", "checkpoint.every=0", check=True)
    with (out / "metrics.jsonl").open("a") as f:  # a run killed after logging step 3 and half of step 4
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    _train(good, out, "train.steps=5", "checkpoint.every=0", check=True)
    rows = _metrics(out)
    assert [m["step"] for m in rows if "loss" in m] == [1, 2, 3, 4, 5]
    assert [m["step"] for m in rows if "eval_loss" in m] == [5]


# ----------------------------------------------------------------------------- permissions


def test_outputs_get_the_umask_permissions(good, tmp_path):
    """Issue 15 item 11: adapter/ and checkpoints were 0700 with 0600 files."""
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        _train(good, out, "train.steps=3", "checkpoint.every=1", check=True)
    finally:
        os.umask(previous)
    for path in [out, out / "adapter", out / "checkpoints", *(out / "checkpoints").glob("step-*")]:
        assert path.stat().st_mode & 0o777 == 0o755, path
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "lora.safetensors", "optimizer.safetensors",
                                        "state.json", "latest", "config.json", "metrics.jsonl", RUN_MARKER}
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o644, path


# ----------------------------------------------------------------------------- a kill between two renames


_KILLED_WHILE_PUBLISHING_THE_ADAPTER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import lora_dist.atomic as atomic

    atomic.rename_exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(".adapter.old-"):  # the previous adapter is set aside: SIGKILL here
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    from lora_dist.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture
def killed_mid_publish(good, tmp_path):
    """A finished run whose rerun was SIGKILLed between the two renames of the adapter publish."""
    out = tmp_path / "run"
    _train(good, out, check=True)
    previous = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    cmd = [sys.executable, "-c", _KILLED_WHILE_PUBLISHING_THE_ADAPTER,
           *_args(good, out, "train.steps=3", "output.overwrite=true")]
    proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "adapter").exists()
    aside = list(out.glob(".adapter.old-*"))
    assert len(aside) == 1 and (aside[0] / "adapter_model.safetensors").read_bytes() == previous
    return out, previous


def test_a_rerun_repairs_a_kill_between_the_two_renames_and_export_works(good, tmp_path, killed_mid_publish):
    """Issue 15 item 8: only .adapter.old-PID and .adapter.tmp-* were left; export failed, a rerun did not repair."""
    out, _ = killed_mid_publish
    proc = _train(good, out, "train.steps=3", f"checkpoint.resume={tmp_path / 'nope'}")  # fails after the run dir
    _one_line_error(proc, "is not a checkpoint dir")                                     # is opened
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # put back before anything else
    assert not list(out.glob(".adapter.*"))
    _train(good, out, "train.steps=3", "output.overwrite=true", check=True)
    assert not list(out.glob(".adapter.*"))
    merged = tmp_path / "merged"
    lora_dist("export", str(out), "--out", str(merged), check=True)
    assert (merged / "config.json").is_file()


def test_export_right_after_a_kill_between_the_two_renames_reads_the_previous_adapter(good, tmp_path,
                                                                                     killed_mid_publish):
    out, previous = killed_mid_publish
    proc = lora_dist("export", str(out), "--out", str(tmp_path / "merged"), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == previous


# ----------------------------------------------------------------------------- faults and nonsense


def test_disk_full_during_a_checkpoint_write(good, small_disk):
    """Issue 15 item 10: ENOSPC was a traceback. One line, exit 2; step-000002 and `latest` intact."""
    out = small_disk(64) / "run"
    proc = _train(good, out, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2")
    _one_line_error(proc, "cannot write checkpoint step-000004", "no space left on device",
                    "the previous checkpoint step-000002 and latest are intact")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002"]
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    assert load_file(str(ckpts / "step-000002" / "lora.safetensors"))
    assert json.loads((ckpts / "step-000002" / "state.json").read_text())["step"] == 2


@pytest.fixture(scope="module")
def stopped_at_2(good):
    """A run of 6 steps stopped after its one checkpoint, step 2 (each test corrupts its own copy)."""
    out = good["root"] / "stopped-at-2"
    _train(good, out, "train.steps=6", "train.run_steps=2", "checkpoint.every=2", check=True)
    return out


@pytest.mark.parametrize("state", [{"step": -3}, {"step": "7"}, {"step": 2.5}, {"step": True}, [1, 2],
                                   {"step": 2, "samples_consumed": -1}, {"step": 5}])
def test_nonsense_state_json_is_one_line_never_a_traceback(good, stopped_at_2, tmp_path, state):
    """Issue 15 item 10: a negative step was a traceback. Named: an error; found by auto: skipped, or refused
    when it is the run's only checkpoint (never a silent restart from step 0 over it)."""
    auto = "cannot tell which run wrote it" if isinstance(state, list) else "no readable checkpoint of this run"
    out = tmp_path / "run"
    shutil.copytree(stopped_at_2, out, symlinks=True)
    ckpt = out / "checkpoints" / "step-000002"
    record = json.loads((ckpt / "state.json").read_text())
    bad = {**record, **state} if isinstance(state, dict) else state
    (ckpt / "state.json").write_text(json.dumps(bad))
    _one_line_error(_train(good, out, "train.steps=6", f"checkpoint.resume={ckpt}"), str(ckpt))
    _one_line_error(_train(good, out, "train.steps=6"), auto, str(ckpt))


def test_exploding_lora_weights_stop_the_run_naming_the_step(good, tmp_path):
    """Issue 15 item 9: lr=1e30 gave lora_B ~ 1e30 with a finite loss and grad_norm 0.0, exit 0.
    (The config now refuses train.lr > 1; this is the loop's own guard, for whatever blows up.)"""
    import lora_dist.train as train_mod
    from lora_dist.config import load_config
    from lora_dist.launch import destroy_distributed

    out = tmp_path / "run"
    cfg = load_config(None, _args(good, out, "train.steps=4", "checkpoint.every=1", "train.warmup_steps=0")[1:])
    cfg.train.lr = 1e30
    try:
        with pytest.raises(train_mod.TrainingDiverged, match=r"LoRA weights exploded at step 1: .*lora_B.weight "
                                                             r"reached .*e\+30 .*train.lr=1e\+30.*Lower train.lr"):
            train_mod.train(cfg)
    finally:
        destroy_distributed()
    assert not (out / "adapter").exists() and not list((out / "checkpoints").glob("step-*"))


def test_a_step_without_target_tokens_is_not_logged_as_loss_zero(good, tmp_path):
    """Issue 15 item 9: such a batch was logged as loss 0.0. Its row has "loss": null, "target_tokens": 0."""
    data = tmp_path / "prompts.jsonl"
    prompt = " ".join(["the cat sat on the mat"] * 60)
    data.write_text("".join(json.dumps({"prompt": prompt, "completion": " ok"}) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    # split: each prompt's pieces are blocks without a target (auto would leave these prompts out, and refuse data
    # with nothing left to train on)
    proc = _train(good, out, f"data.path={data}", "train.steps=6", "train.micro_batch_size=1",
                  "data.eval_fraction=0", "data.long_documents=split", check=True)
    rows = [m for m in _metrics(out) if "step" in m]
    empty = [m for m in rows if m.get("target_tokens") == 0]
    assert empty and all(m["loss"] is None for m in empty)
    assert all(isinstance(m["loss"], float) and m["loss"] > 0 for m in rows if m.get("target_tokens") != 0)
    assert "no target tokens in the global batch" in proc.stderr


def test_forward_backward_of_a_batch_without_targets_is_nan_not_zero(tiny_model):
    from lora_dist.data import IGNORE
    from lora_dist.lora import LoRAConfig, inject_lora
    from lora_dist.parallel.engine import Engine
    from lora_dist.train import forward_backward

    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    engine = Engine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), 0.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, IGNORE), "position_ids": torch.arange(8).expand(2, 8),
             "attention_mask": None}
    loss, n = forward_backward(engine, [batch])
    assert n == 0 and loss != loss


@pytest.mark.parametrize("poison,match", [
    (float("nan"), "b.lora_B.weight is not finite"),
    (float("-inf"), "b.lora_B.weight is not finite"),
    (-3e5, "b.lora_B.weight reached 3e\\+05"),
])
def test_the_lora_weight_check_names_the_worst_tensor(poison, match):
    """Every LoRA tensor's largest magnitude, NaN and a negative extreme included, bf16 ones and the empty
    partitions a ZeRO-3 rank may hold among them; below the limit nothing is raised."""
    from types import SimpleNamespace

    import lora_dist.train as train_mod

    named = [("a.lora_A.weight", torch.full((2, 3), 2.0)), ("z.lora_A.weight", torch.empty(0)),
             ("h.lora_A.weight", torch.ones(4, dtype=torch.bfloat16)), ("b.lora_B.weight", torch.zeros(3, 2))]
    engine = SimpleNamespace(named_lora_params=lambda: named, device=torch.device("cpu"))
    train_mod._check_lora_weights(engine, 5, 1e-3)
    named[3][1][1, 0] = poison
    with pytest.raises(train_mod.TrainingDiverged, match=f"LoRA weights exploded at step 5: {match}"):
        train_mod._check_lora_weights(engine, 5, 1e-3)
