"""Experiment tracking: the metrics of ``metrics.jsonl``, also in TensorBoard, MLflow or W&B.

Rank 0 sends every logged row (loss, eval loss, lr, grad norm, tokens/s,
memory, step time) to each backend the ``tracking.*`` config turns on, and the
run config once, as text (TensorBoard), params (MLflow) or config (W&B):

* TensorBoard, on by default: event files in ``<output.dir>/tensorboard/``.
* MLflow: ``tracking.mlflow`` is a tracking URI (``http://...``, ``databricks``, ``sqlite:///...``) or a
  local directory, used as MLflow's file store.
* W&B: ``tracking.wandb`` is ``offline`` (files under ``<output.dir>/wandb``, ``wandb sync`` them later;
  needs no network) or ``online``.

A resumed run continues the same curves without duplicate steps. TensorBoard
hides the events after the resumed step (``purge_step``) and gets those
steps again; a run started afresh in the same dir hides all of the earlier one's. MLflow and W&B continue the same run (its id is kept in
``<output.dir>/tracking.json``) and are sent only steps after the last one they
received; exact resume recomputes the same values for the steps in between.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lora_dist.atomic import write_text_atomic
from lora_dist.errors import UserError

__all__ = ["SCALARS", "STATE_FILE", "Tracker", "TrackingError", "check_backends", "open_tracker"]

log = logging.getLogger(__name__)

#: metrics.jsonl key -> the scalar's name in every backend.
SCALARS = {
    "loss": "train/loss",
    "eval_loss": "eval/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "step_time_s": "perf/step_time_s",
    "memory_gb": "perf/memory_gb",
}
#: In the run dir: the MLflow/W&B run ids and the last step each received.
STATE_FILE = "tracking.json"


class TrackingError(UserError, ValueError):
    """A tracking backend that cannot be used as configured."""


class _Backend(Protocol):
    name: str

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...


@dataclass
class Tracker:
    """The backends of one run, on rank 0 (elsewhere: no backends, every call a no-op)."""

    backends: list[_Backend]
    state_path: Path | None = None
    state: dict[str, Any] | None = None

    def log(self, record: dict) -> None:
        """Send one ``metrics.jsonl`` row (``step`` plus any of :data:`SCALARS`; null values are skipped)."""
        step = record["step"]
        scalars = {SCALARS[k]: float(v) for k, v in record.items()
                   if k in SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return
        for backend in self.backends:
            if self.state is None or f"{backend.name}_run_id" not in self.state:
                backend.log(scalars, step)
                continue
            sent = self.state.setdefault(f"{backend.name}_sent", {})  # scalar -> the last step it received
            new = {k: v for k, v in scalars.items() if step > sent.get(k, 0)}  # a resumed run sent the rest
            if new:
                backend.log(new, step)
                sent.update(dict.fromkeys(new, step))
        if self.state is not None:
            write_text_atomic(self.state_path, json.dumps(self.state) + "\n")

    def close(self, status: str = "FINISHED") -> None:
        """End every backend's run as ``status``: FINISHED, FAILED, or KILLED (preempted: the requeued run resumes it)."""
        for backend in self.backends:
            try:
                backend.close(status)
            except Exception as e:  # a tracker must never turn a finished run into a failed one
                log.warning("closing the %s tracker failed: %s", backend.name, e)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, log_dir: Path, start_step: int, config: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            raise TrackingError(f"tracking.tensorboard needs the tensorboard package: {_PACKAGES['tensorboard'][1]}"
                                ) from None
        # purge_step hides what an earlier attempt logged where this one logs: a killed attempt's steps after the
        # resumed one; on a fresh start (no checkpoint, output.overwrite) everything, the config at step 0 too.
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else 0)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class _MLflow:
    name = "mlflow"

    def __init__(self, target: str, experiment: str, run_name: str, run_id: str | None, config: dict) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ModuleNotFoundError:
            raise TrackingError(f"tracking.mlflow needs the mlflow package: {_PACKAGES['mlflow'][1]}") from None
        if "://" not in target and not target.startswith(("databricks", "file:")):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local dir: MLflow's file store
            target = Path(target).resolve().as_uri()

        self.client = MlflowClient(tracking_uri=target)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            for key, value in _flatten(config).items():
                self.client.log_param(self.run_id, key, value[:6000])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def log(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _WandB:
    name = "wandb"

    def __init__(self, mode: str, project: str, run_name: str, run_id: str | None, directory: Path,
                 config: dict) -> None:
        try:
            import wandb
        except ModuleNotFoundError:
            raise TrackingError(f"tracking.wandb needs the wandb package: {_PACKAGES['wandb'][1]}") from None
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow" if run_id else None,
                              dir=str(directory), mode=mode, config=config,
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


#: backend -> (the package it imports, how to install it)
_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard, or set tracking.tensorboard=false"),
    "mlflow": ("mlflow", "pip install 'lora_dist[tracking]' (or mlflow)"),
    "wandb": ("wandb", "pip install 'lora_dist[tracking]' (or wandb)"),
}


def check_backends(tracking) -> None:
    """Fail before any work where a tracker that is on has no package.

    Raises:
        TrackingError: naming the setting and the install command.
    """
    import importlib.util

    for name, (package, fix) in _PACKAGES.items():
        if getattr(tracking, name) and importlib.util.find_spec(package) is None:
            raise TrackingError(f"tracking.{name} needs the {package} package: {fix}")


def open_tracker(tracking, out: Path, start_step: int, config: dict, is_main: bool) -> Tracker:
    """The run's tracker (call on every rank; backends live on rank 0 only).

    Args:
        tracking: the ``tracking.*`` section (:class:`~lora_dist.config.TrackingConfig`).
        out: the run dir (``output.dir``).
        start_step: the step the run starts from (0, or the resumed checkpoint's).
        config: the run config as a dict (shown as text / params / config).
        is_main: whether this is rank 0.

    Raises:
        TrackingError: a backend's package is missing or its setting is invalid.
    """
    if not is_main:
        return Tracker([])
    state_path = out / STATE_FILE
    state: dict[str, Any] = {}
    if start_step and state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = {}
    elif state_path.exists():
        state_path.unlink()  # a fresh run starts fresh curves
    run_name = tracking.run_name or out.resolve().name
    backends: list[_Backend] = []
    if tracking.tensorboard:
        backends.append(_TensorBoard(out / "tensorboard", start_step, config))
    if tracking.mlflow:
        mlflow = _MLflow(tracking.mlflow, tracking.project, run_name, state.get("mlflow_run_id"), config)
        state["mlflow_run_id"] = mlflow.run_id
        backends.append(mlflow)
    if tracking.wandb:
        wandb = _WandB(tracking.wandb, tracking.project, run_name, state.get("wandb_run_id"), out, config)
        state["wandb_run_id"] = wandb.run_id
        backends.append(wandb)
    if "mlflow_run_id" in state or "wandb_run_id" in state:
        write_text_atomic(state_path, json.dumps(state) + "\n")
        return Tracker(backends, state_path, state)
    return Tracker(backends)
