"""A user's DeepSpeed config (parallel.deepspeed_config) computes in the dtype model.dtype and
parallel.mixed_precision ask for: its bf16/fp16 sections are set from them, or refused where they disagree."""

from __future__ import annotations

import json
import textwrap

import pytest

from lora_dist.config import ConfigError, load_config
from lora_dist.parallel.deepspeed import deepspeed_config


def _ds(tmp_path, file: dict, *overrides: str, strategy: str = "zero3") -> dict:
    """The DeepSpeed config of a run whose parallel.deepspeed_config holds ``file``."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(file))
    cfg = load_config(None, [f"parallel.strategy={strategy}", f"parallel.deepspeed_config={path}", *overrides])
    return deepspeed_config(cfg, None)


@pytest.mark.parametrize("dtype, mixed, bf16", [
    ("bfloat16", "float32", True),  # a bf16 base: stored and computed in bf16, as the generated config does
    ("float32", "bfloat16", True),  # the bf16 compute asked for
    ("float32", "float32", False),
])
@pytest.mark.parametrize("file", [
    {"zero_optimization": {"stage": 3}},  # no bf16 section: DeepSpeed computed in fp32 whatever the config said
    {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}},  # as the HF Trainer's example files write them
    {"bf16": {"immediate_grad_update": True}},  # a section without "enabled"
], ids=["no-section", "auto", "no-enabled"])
def test_a_files_missing_precision_comes_from_model_dtype_and_mixed_precision(tmp_path, file, dtype, mixed, bf16):
    generated = deepspeed_config(load_config(None, ["parallel.strategy=zero3", f"model.dtype={dtype}",
                                                    f"parallel.mixed_precision={mixed}"]), None)
    ds = _ds(tmp_path, file, f"model.dtype={dtype}", f"parallel.mixed_precision={mixed}")
    assert ds["bf16"]["enabled"] is bf16 is generated["bf16"]["enabled"]
    assert {k: v for k, v in ds["bf16"].items() if k != "enabled"} == \
        {k: v for k, v in file.get("bf16", {}).items() if k != "enabled"}  # the file's other bf16 keys kept
    assert ds.get("fp16", {"enabled": False})["enabled"] is False


def test_the_older_bfloat16_key_is_the_one_set(tmp_path):
    ds = _ds(tmp_path, {"bfloat16": {}}, "model.dtype=bfloat16")
    assert ds["bfloat16"] == {"enabled": True} and "bf16" not in ds  # a "bf16" key would take its place


@pytest.mark.parametrize("file, overrides", [
    ({"bf16": {"enabled": True}}, ["model.dtype=bfloat16"]),
    ({"bf16": {"enabled": "true"}, "fp16": {"enabled": False}}, ["parallel.mixed_precision=bfloat16"]),
    ({"bf16": {"enabled": False}}, []),
])
def test_a_file_that_agrees_is_used_as_written(tmp_path, file, overrides):
    ds = _ds(tmp_path, file, *overrides)
    assert (ds["bf16"], ds.get("fp16")) == (file["bf16"], file.get("fp16"))


@pytest.mark.parametrize("file, overrides, message", [
    ({"bf16": {"enabled": False}}, ["model.dtype=bfloat16"],
     'turns "bf16" off, but model.dtype=bfloat16 and parallel.mixed_precision=float32 ask for bfloat16; set '
     'model.dtype=float32 and parallel.mixed_precision=float32, or leave "enabled" out of the file\'s "bf16" section '
     "(lora_dist sets it from those)"),
    ({"bf16": {"enabled": True}}, [],
     'turns "bf16" on, but model.dtype=float32 and parallel.mixed_precision=float32 ask for float32; set '
     'model.dtype=bfloat16 or parallel.mixed_precision=bfloat16, or leave "enabled" out of the file\'s "bf16" '
     "section (lora_dist sets it from those)"),
    ({"fp16": {"enabled": True}}, ["parallel.mixed_precision=bfloat16"],
     'turns on "fp16", but lora_dist trains no float16 (it needs a loss scaler lora_dist does not run) and '
     'model.dtype=float32 and parallel.mixed_precision=bfloat16 ask for bfloat16; drop the file\'s "fp16" section'),
    ({"bf16": {"enabled": "yes"}}, [], '"bf16": {"enabled": \'yes\'} is not true, false or "auto"'),
    ({"bf16": True}, [], '"bf16" is True, not an object'),
])
def test_a_file_that_contradicts_the_dtypes_is_refused_in_one_line(tmp_path, file, overrides, message):
    """The file's bf16/fp16 section won silently: model.dtype=bfloat16 with "bf16" off built the base in fp32."""
    with pytest.raises(ConfigError) as err:
        _ds(tmp_path, file, *overrides)
    assert str(err.value).startswith(f"parallel.deepspeed_config='{tmp_path / 'ds.json'}'")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.dist
def test_zero3_builds_the_base_in_bf16_from_a_file_without_a_bf16_section(tmp_path):
    """model.dtype=bfloat16 with a user's file holding only the stage: the weights zero.Init partitions are bf16
    (they were fp32: twice the memory of the base)."""
    from distutil import ranks

    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from lora_dist.config import load_config
        from lora_dist.parallel.deepspeed import deepspeed_config, zero_init
        dist.init_process_group("gloo")
        cfg = load_config(None, ["parallel.strategy=zero3", "model.dtype=bfloat16",
                                 "parallel.deepspeed_config={tmp_path / 'ds.json'}"])
        with zero_init(deepspeed_config(cfg, None)):
            layer = torch.nn.Linear(64, 64)
        print("partition dtype", layer.weight.ds_tensor.dtype)
        dist.destroy_process_group()
    """))
    proc = ranks(1, str(script), DS_ACCELERATOR="cpu")
    assert "partition dtype torch.bfloat16" in proc.stdout
