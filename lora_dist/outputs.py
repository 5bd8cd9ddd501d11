"""What lora_dist may write where: the one place every command's outputs are checked.

The contract (``docs/safety.md``): lora_dist creates, replaces or deletes only what it
wrote itself.

* A **run dir** (``output.dir``) is recognised by the marker file :data:`RUN_MARKER`
  lora_dist writes when it creates the run. A non-empty dir without it is refused
  before any work. Run dirs written before the marker existed are recognised by
  their layout (a run ``config.json`` next to ``checkpoints/``, ``adapter/`` or
  ``metrics.jsonl``) and get the marker.
* A **merged export** is recognised by the metadata key lora_dist writes into its
  safetensors headers; ``--overwrite`` replaces only such a dir (or an adapter dir
  lora_dist wrote, for ``save_adapter``).
* An output is never an input: never the base model dir, an adapter dir or a data
  file, never a dir that contains one of them or lies inside one, ``--overwrite``
  or not.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Iterable

__all__ = [
    "RUN_MARKER",
    "OutputError",
    "check_not_an_input",
    "is_adapter_dir",
    "is_model_dir",
    "prepare_run_dir",
    "read_run_marker",
]

#: Written into every run dir lora_dist creates: ``{"run_id": ..., "created": ...}``.
RUN_MARKER = ".lora_dist_run.json"
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_RUN_CONTENTS = ("checkpoints", "adapter", "metrics.jsonl", "merged")


class OutputError(ValueError):
    """An output path that would overwrite or mix with something lora_dist did not write."""


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def is_model_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model dir: ``config.json`` next to weights."""
    p = Path(path)
    return (p / "config.json").is_file() and any((p / f).exists() for f in _MODEL_FILES)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A PEFT-format adapter dir."""
    return any((Path(path) / f).exists() for f in _ADAPTER_FILES)


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str) -> None:
    """Refuse an output that is an input, contains one, or lies inside one (symlinks resolved).

    Args:
        out: the output path.
        inputs: the command's input paths (None entries are skipped).
        what: how the output is named to the user (``output.dir``, ``--out``).

    Raises:
        OutputError: naming the input and the fix.
    """
    target = _real(out)
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = _real(item)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise OutputError(f"{what} {str(out)!r} {relation} the input {str(item)!r}; writing there could replace or "
                          f"delete it: choose a {what} outside every input")


def read_run_marker(run_dir: str | os.PathLike) -> dict | None:
    """The run dir's marker, or None where there is none (or it is unreadable)."""
    try:
        marker = json.loads((Path(run_dir) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("run_id"), str) else None


def _is_legacy_run_dir(path: Path) -> bool:
    """A run dir an earlier lora_dist wrote (before the marker): a run config.json and run contents."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    is_run_config = isinstance(config, dict) and {"model", "lora", "train", "output"} <= set(config)
    return is_run_config and any((path / name).exists() for name in _RUN_CONTENTS)


def prepare_run_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> dict:
    """Make ``out`` a run dir (rank 0, before anything is written into it); returns its marker.

    An absent or empty dir becomes a new run dir; a run dir (marker, or an earlier
    lora_dist's layout) is reused. Anything else is refused, before any work.

    Raises:
        OutputError: ``out`` is or touches an input, or holds files lora_dist did not write.
    """
    check_not_an_input(out, inputs, "output.dir")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output.dir {str(out)!r} is a file; choose a directory for the run")
    marker = read_run_marker(path)
    if marker is not None:
        return marker
    if path.is_dir() and any(path.iterdir()) and not _is_legacy_run_dir(path):
        if is_model_dir(path) or is_adapter_dir(path):
            kind = "a model dir" if is_model_dir(path) else "an adapter dir"
            raise OutputError(f"output.dir {str(out)!r} is {kind}, not a run dir; choose a new or empty output.dir")
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:3])
        raise OutputError(f"output.dir {str(out)!r} holds files lora_dist did not write ({shown}, ...); choose a new "
                          "or empty output.dir")
    path.mkdir(parents=True, exist_ok=True)
    marker = {"run_id": secrets.token_hex(8), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    from lora_dist.atomic import write_text_atomic

    write_text_atomic(path / RUN_MARKER, json.dumps(marker) + "\n")
    return marker
