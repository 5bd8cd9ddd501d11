"""``lora-dist plot RUN_DIR``: PNGs of a run's curves, drawn from its ``metrics.jsonl``.

One figure per quantity, against the optimizer step: loss (with the eval loss),
learning rate, throughput (tokens/s), memory (GB). They are written to
``RUN_DIR/plots/`` and each replaces its previous version atomically, so a plot
made while the run trains is always a whole file.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from lora_dist.errors import UserError

__all__ = ["FIGURES", "PlotError", "Curves", "plot_run", "read_curves"]


class PlotError(UserError, ValueError):
    """A run dir without metrics to plot."""


#: file name -> (title, y label, [(metric key, legend label)])
FIGURES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "loss.png": ("Loss", "loss (token mean)", [("loss", "train"), ("eval_loss", "eval")]),
    "lr.png": ("Learning rate", "lr", [("lr", "lr")]),
    "throughput.png": ("Throughput", "target tokens / s", [("tokens_per_s", "tokens/s")]),
    "memory.png": ("Memory", "GB (CUDA peak, or process RSS)", [("memory_gb", "memory")]),
}


@dataclass
class Curves:
    """Per metric, its ``(step, value)`` points in step order (the last row of a step wins, as on resume)."""

    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = self.points.get(key, [])
        return [s for s, _ in pts], [v for _, v in pts]


def read_curves(metrics: str | os.PathLike) -> Curves:
    """The curves in a ``metrics.jsonl``; torn or foreign lines and null values are skipped.

    Raises:
        PlotError: the file is missing or unreadable, or holds no step with a value.
    """
    path = Path(metrics)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise PlotError(f"{path} not found; pass the output.dir of a run (it holds metrics.jsonl)") from None
    except NotADirectoryError:  # RUN_DIR/metrics.jsonl given for RUN_DIR
        raise PlotError(f"{path.parent} is a file, not a run dir; pass the output.dir of a run (the dir that holds "
                        "metrics.jsonl)") from None
    except IsADirectoryError:
        raise PlotError(f"{path} is a directory, not a metrics file") from None
    except OSError as e:
        raise PlotError(f"cannot read {path} ({e.strerror or e}); pass the output.dir of a run (it holds "
                        "metrics.jsonl)") from None
    by_step: dict[str, dict[int, float]] = {}
    keys = {key for _, _, series in FIGURES.values() for key, _ in series}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                by_step.setdefault(key, {})[row["step"]] = float(value)
    if not by_step:
        raise PlotError(f"{path} holds no metrics yet; plot after the first logged step (train.log_every)")
    return Curves({key: sorted(values.items()) for key, values in by_step.items()})


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Draw :data:`FIGURES` for the run in ``run_dir`` into ``out`` (default ``run_dir/plots``).

    Returns:
        The PNGs written (a figure whose metrics the run never logged is skipped).

    Raises:
        PlotError: no metrics, or matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise PlotError("lora-dist plot needs matplotlib: pip install 'lora_dist[plot]'") from None
    run_dir = Path(run_dir)
    curves = read_curves(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, ylabel, series) in FIGURES.items():
        drawn = [(curves.series(key), label) for key, label in series if curves.points.get(key)]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for (steps, values), label in drawn:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set(title=f"{title}: {run_dir.name}", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend()
        fig.tight_layout()
        target = out / name
        tmp = target.with_name(f".{name}.tmp-{secrets.token_hex(4)}.png")
        try:
            fig.savefig(tmp)
            os.replace(tmp, target)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written
