"""Experiment tracking: TensorBoard, MLflow (local store) and W&B (offline), fresh and resumed.

Each backend is read back with its own reader and compared with what was
logged: the same scalars at the same steps, and after a resume the same
curve continued with every step exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from lora_dist.tracking import SCALARS, STATE_FILE, TrackingError, open_tracker


@dataclass
class Tracking:  # the tracking.* section's fields
    tensorboard: bool = True
    mlflow: str = ""
    wandb: str = ""
    project: str = "lora_dist"
    run_name: str = ""


@pytest.fixture(autouse=True)
def _no_wandb_service_left_behind(monkeypatch):
    """``wandb.init`` exports ``WANDB_SERVICE`` (its service's socket) into this process's environment; once the run
    has finished, the service is gone, and a later run started from this test process (the zygote's) waited on
    that socket until its timeout. Each test's environment is restored."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


CONFIG = {"model": {"path": "/models/tiny"}, "lora": {"r": 8, "target_modules": ["q_proj"]}, "train": {"lr": 1e-3}}


def _row(step: int) -> dict:
    return {"step": step, "loss": 3.0 - 0.25 * step, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0 * step,
            "step_time_s": 0.2, "memory_gb": 1.5}


def _attempt(tracking, out, start: int, end: int, killed: bool = False, eval_at: int | None = None):
    """Log steps start+1..end as a run (resumed from ``start``) would; ``killed``: no close()."""
    out.mkdir(exist_ok=True)  # the run dir, made by train() before the tracker
    tracker = open_tracker(tracking, out, start, CONFIG, is_main=True)
    for step in range(start + 1, end + 1):
        tracker.log(_row(step))
        if step == eval_at:
            tracker.log({"step": step, "eval_loss": 9.0})
    if not killed:
        tracker.close()
    return tracker


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_has_every_scalar_and_the_config(tmp_path):
    _attempt(Tracking(), tmp_path, 0, 4, eval_at=4)
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == set(SCALARS.values())
    assert scalars["train/loss"] == [(s, pytest.approx(_row(s)["loss"])) for s in range(1, 5)]
    assert scalars["eval/loss"] == [(4, 9.0)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"target_modules"' in text and '"q_proj"' in text


def _next_second() -> None:
    """Wait for the next second: TensorBoard reads event files in name order, <seconds>.<host>.<pid>.<counter>, and
    a later attempt is a later process, a later second. Within one second of one test process the counter decides,
    as text ("10" < "9")."""
    import time

    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


def test_tensorboard_resume_continues_the_curve_without_duplicates(tmp_path):
    _attempt(Tracking(), tmp_path, 0, 5, killed=True)  # steps 4-5 were after the last checkpoint (3)
    _next_second()
    _attempt(Tracking(), tmp_path, 3, 7)
    steps = [s for s, _ in _tensorboard_scalars(tmp_path / "tensorboard")["train/loss"]]
    assert steps == list(range(1, 8))


@pytest.mark.parametrize("first", ["killed", "finished"])
def test_tensorboard_of_a_run_started_afresh_shows_only_the_new_run(tmp_path, first):
    """A run started again from step 0 in the same dir (no checkpoint to resume: a crash before the first one, or
    output.overwrite=true) hides what the earlier run logged, its config too: one curve, the new run's. (The
    config text is read as TensorBoard's server reads it, every summary a tensor; the older reader of the scalars
    purges no tensors.)"""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    _attempt(Tracking(), tmp_path, 0, 5, killed=first == "killed")
    _next_second()
    tracker = open_tracker(Tracking(), tmp_path, 0, CONFIG, is_main=True)
    for step in (1, 2, 3):
        tracker.log({**_row(step), "loss": 10.0 + step})
    tracker.close()
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0)]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0]
    assert [e.step for e in acc.Tensors("train/loss")] == [1, 2, 3]


def test_mlflow_local_store_resume_continues_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    tracking = Tracking(tensorboard=False, mlflow=str(store), project="exp")
    first = _attempt(tracking, tmp_path / "run", 0, 5, killed=True, eval_at=2)
    run_id = first.state["mlflow_run_id"]
    _attempt(tracking, tmp_path / "run", 3, 7, eval_at=6)
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 8))  # one run, every step once
    assert {m.step: m.value for m in history} == {s: pytest.approx(_row(s)["loss"]) for s in range(1, 8)}
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/loss")) == [2, 6]
    run = client.get_run(run_id)
    assert run.data.params["lora.r"] == "8" and run.data.params["model.path"] == "/models/tiny"
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_wandb_offline_resume_keeps_the_run_and_sends_each_step_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracking = Tracking(tensorboard=False, wandb="offline")
    sent: list[int] = []
    first = _attempt(tracking, tmp_path, 0, 5)
    run_id = first.state["wandb_run_id"]
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))  # `wandb sync` uploads it later
    resumed = open_tracker(tracking, tmp_path, 3, CONFIG, is_main=True)
    assert resumed.state["wandb_run_id"] == run_id
    backend = resumed.backends[0]
    backend.log = lambda scalars, step: sent.append(step)  # record what reaches W&B
    for step in range(4, 8):
        resumed.log(_row(step))
    resumed.close()
    assert sent == [6, 7]
    assert json.loads((tmp_path / STATE_FILE).read_text())["wandb_sent"]["train/loss"] == 7


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_mlflow_records_a_failed_or_preempted_run_as_such(tmp_path, status):
    """Every run ended FINISHED in MLflow, diverged, failed and preempted ones too."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    (tmp_path / "run").mkdir()
    tracker = open_tracker(Tracking(tensorboard=False, mlflow=str(store)), tmp_path / "run", 0, CONFIG, is_main=True)
    tracker.log(_row(1))
    tracker.close(status)
    run = MlflowClient(tracking_uri=store.resolve().as_uri()).get_run(tracker.state["mlflow_run_id"])
    assert run.info.status == status


def test_wandb_finishes_its_run_without_a_warning(tmp_path, monkeypatch, caplog):
    """``Run.finish(quiet=True)`` raised TypeError on wandb 0.31 (no such argument): the warning was logged and the
    run never finished (W&B shows it crashed). A failed run finishes with a non-zero exit code."""
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    for status, code in (("FINISHED", 0), ("FAILED", 1)):
        (tmp_path / status).mkdir()
        tracker = open_tracker(Tracking(tensorboard=False, wandb="offline"), tmp_path / status, 0, CONFIG, is_main=True)
        run, finished = tracker.backends[0].run, []
        real = run.finish
        monkeypatch.setattr(run, "finish", lambda **kwargs: (finished.append(kwargs.get("exit_code")), real(**kwargs)))
        tracker.log(_row(1))
        tracker.close(status)
        assert finished == [code] and wandb.run is None
    assert "closing the wandb tracker failed" not in caplog.text


def test_a_fresh_run_forgets_an_old_runs_ids(tmp_path):
    tracking = Tracking(tensorboard=False, mlflow=str(tmp_path / "mlruns"))
    old = _attempt(tracking, tmp_path / "run", 0, 2).state["mlflow_run_id"]
    new = _attempt(tracking, tmp_path / "run", 0, 2).state["mlflow_run_id"]
    assert new != old


def test_other_ranks_track_nothing(tmp_path):
    tracker = open_tracker(Tracking(mlflow=str(tmp_path / "mlruns")), tmp_path, 0, CONFIG, is_main=False)
    tracker.log(_row(1))
    tracker.close()
    assert tracker.backends == [] and not list(tmp_path.iterdir())


def test_a_missing_backend_package_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ModuleNotFoundError
    with pytest.raises(TrackingError, match=r"pip install 'lora_dist\[tracking\]'"):
        open_tracker(Tracking(tensorboard=False, wandb="offline"), tmp_path, 0, CONFIG, is_main=True)


def test_a_training_run_and_its_resume_feed_one_curve_per_tracker(tiny_checkpoint, tmp_path, monkeypatch):
    """`lora-dist train` in two invocations (train.run_steps): TensorBoard and MLflow hold steps 1-4 once,
    equal to metrics.jsonl, in one MLflow run, with the final eval loss."""
    from mlflow.tracking import MlflowClient

    # this test's own client reads the file store the runs wrote (the runs allow it themselves; run alone, this
    # process did not)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    from distutil import lora_dist
    from lora_dist.demo import write_demo_data

    data = write_demo_data(tmp_path / "data.jsonl", n=60)
    out, store = tmp_path / "run", tmp_path / "mlruns"
    args = ["train", f"model.path={tiny_checkpoint('llama')}", f"data.path={data}", "train.steps=4",
            "train.seq_len=32", "train.micro_batch_size=2", "data.eval_fraction=0.2", "lora.r=2",
            "parallel.strategy=none", f"output.dir={out}", f"tracking.mlflow={store}", "train.run_steps=2"]
    lora_dist(*args)
    lora_dist(*args)  # resumes at step 2 and finishes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert scalars["train/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    assert [s for s, _ in scalars["eval/loss"]] == [4]
    run_id = json.loads((out / STATE_FILE).read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")) == \
        [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
