"""PEFT-format adapters: what we save loads in PEFT, what PEFT saves loads here."""

from __future__ import annotations

import json
import os
import types

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from distutil import randomize_lora_B

import lora_dist.adapter as adapter_mod
from lora_dist import atomic
from lora_dist.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    load_adapter,
    lora_state_dict,
    read_adapter,
    save_adapter,
    write_adapter,
)
from lora_dist.lora import LoRAConfig, inject_lora, lora_modules

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}

# The selection rules PEFT has to reproduce from the saved adapter_config.json.
CONFIGS = {
    "plain": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, use_rslora=True),
    "patterns": dict(r=4, alpha=8, rank_pattern={"v_proj|c_fc": 2}, alpha_pattern={"q_proj|c_proj": 3.0}),
    "layers": dict(r=4, alpha=8, layers_to_transform=[1]),
    "all-linear": dict(r=2, alpha=4, target_modules="all-linear", exclude_modules=["o_proj", "c_proj"]),
    "regex": dict(r=2, alpha=4, target_modules=r".*\.0\..*(q_proj|v_proj|c_attn)"),
}


def adapted(tiny_model, arch: str, seed: int = 0, sizes: dict | None = None, **config) -> nn.Module:
    """A tiny model (``sizes`` go to ``tiny_model``) with LoRA and random non-zero A and B."""
    model = tiny_model(arch, **(sizes or {}))
    inject_lora(model, LoRAConfig(**{"target_modules": TARGETS.get(arch), **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_adapted(base: nn.Module, seed: int = 0, **config) -> nn.Module:
    """PEFT's LoRA with random non-zero A and B."""
    model = peft.get_peft_model(base, peft.LoraConfig(**config)).eval()
    randomize_lora_B(model, seed)
    return model


# ---------------------------------------------------------------------------- ours -> PEFT


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_saved_adapter_loads_in_peft_with_same_logits(arch, case, tiny_model, token_ids, tmp_path):
    model = adapted(tiny_model, arch, **CONFIGS[case])
    save_adapter(model, tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter").eval()

    assert {n.removeprefix("base_model.model.") for n in reference.targeted_module_names} == {
        n for n, _ in lora_modules(model)
    }
    ids = token_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "bert"])
def test_other_architectures_roundtrip_through_peft(arch, tiny_model, token_ids, tmp_path):
    model = adapted(tiny_model, arch, r=4, alpha=8, target_modules=None)  # the architecture's default targets
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["task_type"] == (None if arch == "bert" else "CAUSAL_LM")  # PEFT's CAUSAL_LM wrapper needs generate
    reference = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter").eval()
    ids = token_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)
    loaded = load_adapter(tiny_model(arch), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)


def test_adapter_config_has_the_keys_peft_expects(tiny_model, tiny_checkpoint, tmp_path):
    model = adapted(tiny_model, "llama", r=4, alpha=8, dropout=0.1)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())

    peft_fields = set(peft.LoraConfig().to_dict())
    assert set(saved) <= peft_fields, f"keys PEFT does not know: {set(saved) - peft_fields}"
    for key in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "fan_in_fan_out", "use_rslora",
                "bias", "lora_dropout", "rank_pattern", "alpha_pattern", "base_model_name_or_path"):
        assert key in saved, key
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["lora_dropout"] == 0.1 and saved["bias"] == "none"
    assert sorted(saved["target_modules"]) == sorted(TARGETS["llama"])
    assert saved["base_model_name_or_path"] == str(tiny_checkpoint("llama"))

    loaded = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert loaded.r == 4 and loaded.lora_alpha == 8 and not loaded.fan_in_fan_out

    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert set(tensors) == {f"base_model.model.{k}" for k in lora_state_dict(model)}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors


def test_gpt2_adapter_config_sets_fan_in_fan_out(tiny_model, tmp_path):
    save_adapter(adapted(tiny_model, "gpt2", r=4, alpha=8), tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    assert all(w.fan_in_fan_out for w in read_adapter(tmp_path / "adapter").weights().values())


# ---------------------------------------------------------------------------- PEFT -> ours


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8),
        dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj|c_fc": 2}, alpha_pattern={"q_proj|c_proj": 5}),
        dict(r=2, lora_alpha=4, target_modules="all-linear"),
    ],
    ids=["plain", "rslora-patterns", "all-linear"],
)
def test_peft_adapter_loads_with_same_logits(arch, config, tiny_model, token_ids, tmp_path):
    config = {"target_modules": TARGETS[arch], "fan_in_fan_out": arch == "gpt2", **config}
    reference = peft_adapted(tiny_model(arch), **config)
    reference.save_pretrained(tmp_path / "peft")

    model = load_adapter(tiny_model(arch), tmp_path / "peft")
    assert {n for n, _ in lora_modules(model)} == {
        n.removeprefix("base_model.model.") for n in reference.targeted_module_names
    }
    ids = token_ids(model)
    want = logits(reference, ids)
    with reference.disable_adapter():
        effect = float((want - logits(reference, ids)).abs().max())  # what the adapter changes
    # The same math rounded in another order (lora_dist scales the rank-r hidden, PEFT the update): within 0.1%
    # of the adapter's effect, where a wrong scale or a missed layer is a large part of it.
    assert effect > 1e-3
    torch.testing.assert_close(logits(model, ids), want, atol=1e-3 * effect, rtol=0)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    # ... and saving it again gives PEFT the same adapter back.
    save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "again").eval()
    torch.testing.assert_close(logits(again, ids), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_load_adapter_into_an_injected_model(use_rslora, tiny_model, token_ids, tmp_path):
    source = adapted(tiny_model, "llama", r=4, alpha=8, use_rslora=use_rslora, rank_pattern={"v_proj": 2},
                     alpha_pattern={"q_proj": 2.0})
    save_adapter(source, tmp_path / "adapter")
    target = tiny_model("llama")
    inject_lora(target, LoRAConfig(r=4, alpha=8, target_modules=TARGETS["llama"], rank_pattern={"v_proj": 2}))
    load_adapter(target, tmp_path / "adapter")
    for (name, ours), (_, theirs) in zip(lora_modules(target), lora_modules(source)):
        assert torch.equal(ours.lora_A.weight, theirs.lora_A.weight), name
        assert torch.equal(ours.lora_B.weight, theirs.lora_B.weight), name
        assert (ours.scale, ours.alpha, ours.use_rslora) == (theirs.scale, theirs.alpha, theirs.use_rslora), name
    ids = token_ids(source)
    torch.testing.assert_close(logits(target, ids), logits(source, ids), atol=0, rtol=0)

    # Saved again, it is still the source's adapter.
    save_adapter(target, tmp_path / "again")
    reference = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "again").eval()
    torch.testing.assert_close(logits(reference, ids), logits(source, ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- refusals


def test_pickled_adapter_is_refused(tiny_model, tmp_path):
    reference = peft_adapted(tiny_model("llama"), r=2, target_modules=["q_proj"])
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(tiny_model("llama"), tmp_path / "bin")


def test_shape_mismatch_is_an_error(tiny_model, tmp_path):
    save_adapter(adapted(tiny_model, "llama", r=4, alpha=8, sizes={"hidden": 64}), tmp_path / "wide")
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(tiny_model("llama"), tmp_path / "wide")

    save_adapter(adapted(tiny_model, "llama", r=4, alpha=8), tmp_path / "r4")
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules=TARGETS["llama"]))
    with pytest.raises(AdapterError, match=r"lora_A: adapter shape \(4, \d+\) != model shape \(2, \d+\)"):
        load_adapter(model, tmp_path / "r4")


def test_adapter_for_other_modules_is_an_error(tiny_model, tmp_path):
    save_adapter(adapted(tiny_model, "llama", r=2, alpha=4), tmp_path / "adapter")
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(AdapterError, match="not in the model"):
        load_adapter(model, tmp_path / "adapter")


def test_empty_and_non_finite_tensors_are_refused_on_save(tiny_model, tmp_path):
    model = adapted(tiny_model, "llama", r=2, alpha=4)
    layer = dict(lora_modules(model))["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN/Inf"):
        save_adapter(model, tmp_path / "adapter")
    layer.lora_B.weight = nn.Parameter(torch.empty(0))  # what an un-gathered shard looks like
    with pytest.raises(AdapterError, match="empty"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(AdapterError, match="no tensors"):
        write_adapter(tmp_path / "adapter", {}, {})
    with pytest.raises(AdapterError, match="inject_lora"):
        save_adapter(tiny_model("llama"), tmp_path / "adapter")


def test_a_dir_that_is_not_an_adapter_is_never_replaced(tiny_model, tiny_checkpoint, tmp_path):
    """Writing an adapter replaces its whole dir: a user's folder, or the base model dir passed by mistake, is
    refused in one line with nothing changed; an adapter dir (or an empty one) is replaced."""
    model = adapted(tiny_model, "llama", r=2, alpha=4)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's\n")
    with pytest.raises(AdapterError, match=r"it holds notes\.txt, and writing replaces the whole dir.*new or empty"):
        save_adapter(model, folder)
    assert sorted(os.listdir(folder)) == ["notes.txt"] and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    base = tiny_checkpoint("llama")
    before = sorted(os.listdir(base))
    with pytest.raises(AdapterError, match="and [0-9]+ more") as refused:
        save_adapter(model, base)
    assert "\n" not in str(refused.value) and sorted(os.listdir(base)) == before
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        save_adapter(model, tmp_path / "a-file")
    empty = tmp_path / "empty"
    empty.mkdir()
    save_adapter(model, empty)
    save_adapter(model, empty)  # an adapter dir: replaced
    assert sorted(os.listdir(empty)) == ["adapter_config.json", "adapter_model.safetensors"]


def _fail(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize("failing", ["write_safetensors", "replace"])
def test_failed_write_leaves_the_existing_adapter_intact(failing, tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    save_adapter(adapted(tiny_model, "llama", r=2, alpha=4, seed=0), target)
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}

    newer = adapted(tiny_model, "llama", r=2, alpha=4, seed=1)
    if failing == "write_safetensors":
        monkeypatch.setattr(adapter_mod, "write_safetensors", _fail)
    else:  # the rename of the finished temp dir into place fails
        real_replace = os.replace

        real_exchange = atomic.rename_exchange

        def replace(src, dst):
            if ".tmp-" in str(src):
                raise OSError("disk full")
            return real_replace(src, dst)

        def exchange(src, dst):
            if ".tmp-" in str(src):
                raise OSError("disk full")
            return real_exchange(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(atomic, "rename_exchange", exchange)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(newer, target)
    monkeypatch.undo()

    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert os.listdir(tmp_path) == ["adapter"], "temporary files were left behind"
    save_adapter(newer, target)
    assert torch.equal(read_adapter(target).tensors["model.layers.0.self_attn.q_proj.lora_B.weight"],
                       dict(lora_modules(newer))["model.layers.0.self_attn.q_proj"].lora_B.weight)


def _write(directory, config=None, tensors=None):
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **(config or {})}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))
    if tensors is None:
        tensors = {"base_model.model.q_proj.lora_A.weight": torch.ones(2, 8),
                   "base_model.model.q_proj.lora_B.weight": torch.ones(8, 2)}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    return directory


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        ({"peft_type": "IA3"}, None, "LORA only"),
        ({"use_dora": True}, None, "DoRA"),
        ({"r": 0}, None, "invalid LoRA config"),
        (None, {"base_model.model.q_proj.lora_A.weight": torch.ones(2, 8)}, "without lora_B"),
        (None, {"base_model.model.q_proj.lora_A.weight": torch.ones(2, 8),
                "base_model.model.q_proj.lora_B.weight": torch.ones(8, 2),
                "base_model.model.lm_head.weight": torch.ones(4, 8)}, "cannot apply"),
    ],
    ids=["not-lora", "dora", "bad-rank", "unpaired", "modules-to-save"],
)
def test_read_adapter_refuses_what_it_cannot_apply(config, tensors, match, tmp_path):
    with pytest.raises(AdapterError, match=match):
        read_adapter(_write(tmp_path / "adapter", config, tensors))


def test_read_adapter_missing_or_corrupt_files(tmp_path):
    with pytest.raises(AdapterError, match=ADAPTER_CONFIG):
        read_adapter(tmp_path)
    directory = _write(tmp_path / "adapter")
    (directory / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(directory)
    directory = _write(tmp_path / "adapter2")
    (directory / ADAPTER_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        read_adapter(directory)
    os.remove(directory / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(directory)


# Adapters that were accepted silently or gave tracebacks (issue 15, items 9 and 10): one line each.


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        (None, {}, "holds no LoRA tensors"),
        (None, {"base_model.model.q_proj.lora_A.weight": torch.ones(2, 8, dtype=torch.int8),
                "base_model.model.q_proj.lora_B.weight": torch.ones(8, 2, dtype=torch.int8)},
         "q_proj.lora_A.weight is int8; LoRA tensors must be floating point"),
        ({"r": 8}, {"base_model.model.q_proj.lora_A.weight": torch.ones(4, 8),
                    "base_model.model.q_proj.lora_B.weight": torch.ones(8, 4)},
         r"q_proj holds rank-4 tensors but adapter_config.json gives it r=8"),
        ({"r": 8, "rank_pattern": {"q_proj": 2}}, {"base_model.model.q_proj.lora_A.weight": torch.ones(4, 8),
                                                   "base_model.model.q_proj.lora_B.weight": torch.ones(8, 4)},
         r"q_proj holds rank-4 tensors but adapter_config.json gives it r=2"),
        (None, {"base_model.model.q_proj.lora_A.weight": torch.ones(16),
                "base_model.model.q_proj.lora_B.weight": torch.ones(8, 2)},
         r"q_proj.lora_A.weight has shape \(16,\); LoRA tensors are 2-D"),
        (None, {"base_model.model.q_proj.lora_A.weight": torch.ones(2, 8),
                "base_model.model.q_proj.lora_B.weight": torch.ones(8, 3)},
         "lora_A of rank 2 but lora_B of rank 3"),
        ({"alpha_pattern": {"(": 2.0}}, None, r"lora.alpha_pattern key '\(' is not a valid regex"),
        ({"rank_pattern": {"q_proj[": 2}}, None, r"lora.rank_pattern key 'q_proj\[' is not a valid regex"),
        ({"r": "eight"}, None, "invalid LoRA config"),
        ({"r": None}, None, "invalid LoRA config"),
    ],
    ids=["no-tensors", "int8", "r8-rank4", "rank-pattern", "1d-lora-A", "unequal-ranks", "bad-alpha-pattern",
         "bad-rank-pattern", "r-string", "r-null"],
)
def test_read_adapter_refuses_what_would_merge_wrongly(config, tensors, match, tmp_path):
    with pytest.raises(AdapterError, match=match) as e:
        read_adapter(_write(tmp_path / "adapter", config, tensors))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, match",
    [
        (b'["peft_type", "LORA"]', "must hold a JSON object"),
        (b"42", "must hold a JSON object"),
        (b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_\xe9"]}', "not UTF-8 text"),
        (b"[" * 100_000, "nested too deeply"),
    ],
    ids=["list", "number", "latin1", "deep"],
)
def test_adapter_config_that_is_not_a_lora_config_object(content, match, tmp_path):
    directory = _write(tmp_path / "adapter")
    (directory / ADAPTER_CONFIG).write_bytes(content)
    with pytest.raises(AdapterError, match=match) as e:
        read_adapter(directory)
    assert "\n" not in str(e.value)


def test_a_rank_pattern_that_matches_reads_fine(tmp_path):
    tensors = {"base_model.model.q_proj.lora_A.weight": torch.ones(4, 8),
               "base_model.model.q_proj.lora_B.weight": torch.ones(8, 4)}
    adapter = read_adapter(_write(tmp_path / "adapter", {"r": 8, "rank_pattern": {"q_proj": 4}}, tensors))
    assert adapter.weights()["q_proj"].scale == 4 / 4


def _lora(r: int, width: int) -> dict[str, torch.Tensor]:
    return {"model.q_proj.lora_A.weight": torch.randn(r, width), "model.q_proj.lora_B.weight": torch.randn(width, r)}


@pytest.mark.parametrize("space_check", ["before", "during"])
def test_disk_full_during_an_adapter_write_keeps_the_previous_adapter(space_check, small_disk, monkeypatch):
    tiny_disk = small_disk(64)
    target = tiny_disk / "adapter"
    write_adapter(target, _lora(2, 64), {"r": 2})
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    if space_check == "during":  # the free-space check passes (as on some network filesystems): the write fails
        monkeypatch.setattr(adapter_mod.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=1 << 40))
    with pytest.raises(AdapterError, match=r"(not enough space|No space left).*free space or choose another "
                                           r"output dir") as e:
        write_adapter(target, _lora(64, 256), {"r": 64})  # 128 KB on a 64 KB disk
    assert isinstance(e.value, OSError) and "\n" not in str(e.value)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert os.listdir(tiny_disk) == ["adapter"], "temporary files were left behind"


def test_a_write_error_reported_at_close_keeps_the_previous_adapter(tmp_path, close_fails):
    """NFS reports a write it could not complete at the file's close; safetensors' save_file ignored that."""
    target = tmp_path / "adapter"
    write_adapter(target, _lora(2, 64), {"r": 2})
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    failed = close_fails()
    with pytest.raises(AdapterError, match="Input/output error") as e:
        write_adapter(target, _lora(4, 64), {"r": 4})
    assert failed == ["adapter_model.safetensors"] and "\n" not in str(e.value)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert os.listdir(tmp_path) == ["adapter"]  # no staging dir left


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("target_modules", [None, ["q_proj"]])
def test_a_peft_expert_adapter_with_rank_pattern_on_its_parameters_merges_like_peft(tiny_checkpoint, tmp_path,
                                                                                     target_modules):
    """PEFT matches rank_pattern/alpha_pattern against a target parameter's name (``...experts.gate_up_proj``), not
    its ParamWrapper's module (``...experts.base_layer``), and writes target_modules [] for target_parameters alone:
    such an adapter is read, loaded and merged as PEFT merges it."""
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapter
    from lora_dist.demo import MOE_EXPERTS
    from lora_dist.export import merge_offline

    path = tiny_checkpoint("qwen3_moe")
    hf = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=target_modules,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"gate_up_proj": 2}, alpha_pattern={"down_proj": 5})
    twin = peft.get_peft_model(hf(path), config)
    randomize_lora_B(twin, 0, 0.1)
    twin.save_pretrained(tmp_path / "adapter")
    gate_up_a = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]
    assert gate_up_a.shape[0] == 2 * MOE_EXPERTS and gate_up_a.shape[0] % 3  # rank 2 from the pattern, not r=3
    ids = torch.randint(0, twin.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = twin.eval()(input_ids=ids).logits
        torch.testing.assert_close(load_adapter(hf(path), tmp_path / "adapter")(input_ids=ids).logits, reference,
                                   atol=1e-5, rtol=0)
    merged_reference = twin.merge_and_unload().state_dict()
    merge_offline(path, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = hf(tmp_path / "merged").state_dict()
    for key, value in merged_reference.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("left_out", [["lora_alpha"], ["r", "lora_alpha"]], ids=["no-alpha", "no-r-no-alpha"])
def test_an_adapter_config_without_r_or_lora_alpha_takes_peft_defaults(left_out, tiny_model, token_ids, tmp_path):
    """PEFT's LoraConfig defaults r and lora_alpha to 8 each (an alpha left out is not r): such a config loads with
    PEFT's scale, so the same logits as PEFT's."""
    r = 16 if left_out == ["lora_alpha"] else 8
    reference = peft_adapted(tiny_model("llama"), r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    reference.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    for key in left_out:
        del config[key]
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps(config))
    twin = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").eval()
    assert twin.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 8 / r

    assert read_adapter(tmp_path / "adapter").weights()["model.layers.0.self_attn.q_proj"].scale == 8 / r
    model = load_adapter(tiny_model("llama"), tmp_path / "adapter")
    ids = token_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("alora_invocation_tokens", [7, 8]),
        ("use_qalora", True),
        ("use_bdlora", {"target_modules_bd_a": ["q_proj"], "nblocks": 2}),
        ("arrow_config", {"top_k": 2}),
        ("kasa_config", {}),
        ("monteclora_config", {"num_samples": 4}),
        ("layer_replication", [[0, 1], [0, 1]]),
        ("trainable_token_indices", [3, 4]),
        ("lora_bias", True),
    ],
)
def test_a_peft_lora_variant_is_refused_by_name(field, value, tmp_path):
    """PEFT's LoRA variants are not scale * B @ A on every token (PEFT itself refuses to merge aLoRA): read as plain
    LoRA they were merged and loaded silently wrong."""
    with pytest.raises(AdapterError, match=rf"adapter_config.json sets {field} \(.*\), which lora_dist does not "
                                           rf"support .*retrain it without {field}$") as e:
        read_adapter(_write(tmp_path / "adapter", {field: value}))
    assert "\n" not in str(e.value)


def test_a_peft_alora_adapter_is_refused(tiny_model, tmp_path):
    """The adapter PEFT writes for aLoRA, which PEFT will not merge: refused, not merged as plain LoRA."""
    reference = peft_adapted(tiny_model("llama"), r=4, lora_alpha=8, target_modules=["q_proj"],
                             alora_invocation_tokens=[7, 8], task_type="CAUSAL_LM")
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        reference.merge_and_unload()
    reference.save_pretrained(tmp_path / "alora")
    with pytest.raises(AdapterError, match="sets alora_invocation_tokens"):
        read_adapter(tmp_path / "alora")


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights:UserWarning")
def test_a_pissa_adapter_merges_as_peft_once_converted_and_is_refused_before(tiny_model, tiny_checkpoint, tmp_path):
    """PiSSA moves the base's principal part into A/B: an adapter saved as it trained is relative to that residual
    base (merged into the base it counted that part twice, silently); PEFT's conversion writes it relative to the
    base, and that one merges as PEFT merges it."""
    from safetensors.torch import load_file

    from lora_dist.export import merge_offline

    base = tiny_checkpoint("llama")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                    init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "initial")  # the adapter as initialized: what conversion subtracts
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "pissa")
    with pytest.raises(AdapterError, match=r"init_lora_weights=pissa moved part of the base weights into the "
                                           r"adapter, .*path_initial_model_for_weight_conversion=DIR\), which") as e:
        read_adapter(tmp_path / "pissa")
    assert "\n" not in str(e.value)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    merge_offline(base, tmp_path / "converted", tmp_path / "merged", dtype="float32")
    reference = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "converted").merge_and_unload()
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name, weight in reference.state_dict().items():
        if name in merged:
            torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-6, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], load_file(str(base / "model.safetensors"))[q])


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_an_embedding_lora_is_refused_naming_the_layer(tiny_model, tmp_path):
    """PEFT names LoRA on an embedding lora_embedding_A/B: said so, not reported as an unpaired lora_A/lora_B."""
    reference = peft_adapted(tiny_model("llama"), r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    reference.save_pretrained(tmp_path / "emb")
    with pytest.raises(AdapterError, match=r"model.embed_tokens is an embedding with LoRA \(lora_embedding_A/B\), "
                                           r"which lora_dist does not support; retrain without embed_tokens in "
                                           r"target_modules$") as e:
        read_adapter(tmp_path / "emb")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("release,misreads", [("0.21.2", True), ("0.21.10", True), ("0.22.0", False),
                                              ("0.23.0.dev0", False), ("1.0.0", False), (None, True)])
def test_which_installed_peft_misreads_the_expert_named_layers(monkeypatch, release, misreads):
    """PEFT 0.21 and earlier load a shared expert's or dense layer's gate/up/down_proj adapter onto the fused experts;
    0.22 reads them as trained (tests/test_hub_archs.py). Without PEFT the adapter may meet any release: warn."""
    import importlib.metadata

    import lora_dist.releases
    from lora_dist.adapter import installed_peft_misreads

    def version(name):
        assert name == "peft"
        if release is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return release

    monkeypatch.setattr(lora_dist.releases, "version", version)
    assert installed_peft_misreads() is misreads
