"""Every shipped config loads and validates (paths aside)."""

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
