"""Every shipped config loads and validates (paths aside), also with the overrides the docs give it."""

import re
from pathlib import Path

import pytest

from lora_dist.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.parallel.strategy in ("fsdp2", "zero3")
    assert cfg.lora.r > 0 and cfg.train.steps > 0


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "llama3_8b_1x8_fsdp2.yaml", "llama3_8b_1x8_zero3.yaml",
            "llama3_70b_8x8_fsdp2.yaml", "llama3_70b_8x8_zero3.yaml"} <= names


REPO = Path(__file__).resolve().parents[1]
#: Where commands that train on a shipped config are written down for people to copy.
DOCS = [REPO / "README.md", REPO / "docs" / "launch.md", REPO / "docs" / "slurm.md",
        *sorted((REPO / "launchers").glob("*.sh"))]
#: A command that trains: its config and the overrides after it.
TRAINING = re.compile(r"(?:lora-dist train|lora_dist\.cli train|launchers/\S+\.sh|\.sbatch)\s+(configs/\S+\.yaml)"
                      r"((?:\s+[a-z_]+\.[a-z_]+=[^\s`]+)*)")


def _documented_runs() -> list[tuple[str, str, list[str]]]:
    runs = []
    for path in DOCS:
        text = re.sub(r"\\\n[ \t]*#?[ \t]*", " ", path.read_text())  # a continued line (in a script's comment too)
        for line in text.splitlines():
            for match in TRAINING.finditer(line):
                runs.append((path.name, match.group(1), match.group(2).split()))
    return runs


def test_documented_training_commands_name_a_model_and_data():
    """configs/demo.yaml names neither: a command copied from the docs stopped with "model.path is not set"."""
    runs = _documented_runs()
    assert len(runs) >= 15 and any(config == "configs/demo.yaml" for _, config, _ in runs)
    for doc, config, overrides in runs:
        cfg = load_config(REPO / config, overrides)
        assert cfg.model.path and cfg.data.path, f"{doc}: {config} {' '.join(overrides)} names no model or data"


def test_documented_sbatch_commands_create_the_log_dir_first():
    """The templates log to logs/, which Slurm does not create: without it the job fails silently."""
    for path in (REPO / "README.md", REPO / "docs" / "slurm.md"):
        lines = [line.strip() for line in path.read_text().splitlines()]
        for i, line in enumerate(lines):
            if line.startswith("sbatch ") and "slurm/" in line:
                assert lines[i - 1] == "mkdir -p logs", f"{path.name}: {line}"
