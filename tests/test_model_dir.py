"""ModelDir and the tokenizer: a bad model dir is one line naming the file and the fix; no code from the dir runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_dist.data import load_tokenizer
from lora_dist.model_dir import SAFE_INDEX, SAFE_SINGLE, ModelDir, ModelDirError


@pytest.fixture
def base(tiny_checkpoint, tmp_path) -> Path:
    """A writable copy of a tiny llama checkpoint."""
    return Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "base"))


@pytest.fixture
def sharded(tiny_checkpoint, tmp_path) -> Path:
    """A writable copy of a tiny checkpoint split over several files with an index."""
    return Path(shutil.copytree(tiny_checkpoint("llama", max_shard_size="40KB"), tmp_path / "sharded"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_a_good_dir_opens_and_reads(base, sharded):
    for path in (base, sharded):
        d = ModelDir(path)
        assert d.config()["model_type"] == "llama"
        key = d.keys()[0]
        assert torch.equal(d.read(key), d.read(key, slice(None)))
        assert d.hf_config.model_type == "llama"
    assert (sharded / SAFE_INDEX).is_file() and len(ModelDir(sharded).files()) > 1


def test_config_is_read_once_and_handed_out_as_a_copy(base):
    d = ModelDir(base)
    d.config()["model_type"] = "changed"
    assert d.config()["model_type"] == "llama"


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", "not valid JSON"),
        (b'["a", "list"]', "must hold a JSON object"),
        (b'{"hidden_size": 32}', "has no model_type"),
        (b'{"model_type": ""}', "has no model_type"),
        (b'{"model_type": "ll\xe9ama"}', r"not UTF-8 text \(byte 0xe9 at line 1, column 19\)"),
        (b"[" * 100_000, "nested too deeply"),
    ],
    ids=["not-json", "list", "no-model-type", "empty-model-type", "latin1", "deep"],
)
def test_invalid_config_json_is_one_line(base, content, match):
    (base / "config.json").write_bytes(content)
    with pytest.raises(ModelDirError, match=match) as e:
        ModelDir(base)
    assert "\n" not in str(e.value) and "config.json" in str(e.value) and len(str(e.value)) < 400


def test_unknown_model_type_is_one_line_when_the_config_is_needed(base):
    _edit_json(base / "config.json", model_type="no_such_architecture")
    d = ModelDir(base)  # the tensors are readable: merging by name needs no architecture
    with pytest.raises(ModelDirError, match="transformers cannot read it") as e:
        d.hf_config
    assert "\n" not in str(e.value)


def test_a_model_that_needs_remote_code_is_refused(base):
    # A model_type transformers lacks, with its code in the dir: transformers would ask to run it.
    _edit_json(base / "config.json", model_type="custom_llm",
               auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (base / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelDirError, match=r"needs code shipped in the model dir.*never runs code.*convert it"):
        ModelDir(base).hf_config


def test_auto_map_next_to_a_native_model_type_uses_the_native_code(base, caplog):
    # Like Phi-3: the hub repo ships custom code, transformers has the architecture; the code never runs.
    _edit_json(base / "config.json", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (base / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    assert type(ModelDir(base).hf_config).__name__ == "LlamaConfig"
    assert "never runs it" in caplog.text


@pytest.mark.parametrize("entry", ["../other/model.safetensors", "/etc/model.safetensors", "a/../../x.safetensors"])
def test_index_entries_must_stay_inside_the_dir(sharded, tmp_path, entry):
    # The case: an index pointing at ../other/model.safetensors, with no weight files in the dir.
    other = tmp_path / "other"
    other.mkdir()
    for f in sharded.glob("*.safetensors"):
        shutil.copy(f, other / SAFE_SINGLE)
        f.unlink()
    index = json.loads((sharded / SAFE_INDEX).read_text())
    index["weight_map"] = {k: entry for k in index["weight_map"]}
    (sharded / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelDirError, match="outside the model dir") as e:
        ModelDir(sharded)
    assert entry in str(e.value) and SAFE_INDEX in str(e.value)


@pytest.mark.parametrize(
    "index, match",
    [
        ('["weight_map"]', "no weight_map"),
        ('{"weight_map": ["model.safetensors"]}', "weight_map must map tensor names to file names"),
        ('{"weight_map": {"a": 3}}', "weight_map must map tensor names to file names"),
        ("{", "not valid JSON"),
    ],
)
def test_corrupt_index_is_one_line(sharded, index, match):
    (sharded / SAFE_INDEX).write_text(index)
    with pytest.raises(ModelDirError, match=match):
        ModelDir(sharded)


def test_an_index_naming_a_file_that_does_not_hold_the_tensor_is_one_line(sharded):
    """A stale index (the weights re-saved in other shards) failed mid-load with safetensors' own error, a
    traceback."""
    index = json.loads((sharded / SAFE_INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = next(f for f in sorted(set(index["weight_map"].values()))
                                    if f != index["weight_map"][key])
    (sharded / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelDirError, match=f"lists {key} in .*, which does not hold it") as e:
        ModelDir(sharded)
    assert "\n" not in str(e.value) and "re-save the checkpoint" in str(e.value)


def test_a_stale_index_beside_model_safetensors_is_ignored_as_transformers_ignores_it(tiny_model, tmp_path, caplog):
    """save_pretrained of a small model into the dir of a sharded save leaves the old index: transformers reads
    model.safetensors and ignores it, so ModelDir reads the same tensors (it refused the dir: the index's shards
    are gone) and says the index is stale."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / SAFE_INDEX).is_file() and (tmp_path / "m" / SAFE_SINGLE).is_file()
    with caplog.at_level("WARNING", logger="lora_dist.model_dir"):
        d = ModelDir(tmp_path / "m")
    assert d.files() == [SAFE_SINGLE]
    assert f"{SAFE_INDEX} does not describe {SAFE_SINGLE}" in caplog.text and "delete the stale index" in caplog.text
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).state_dict()
    assert sorted(d.keys()) == sorted(loaded)
    for key in d.keys():
        assert torch.equal(d.read(key), loaded[key]), key

    # an index that describes model.safetensors itself is said nothing of
    (tmp_path / "m" / SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(d.weight_map)}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lora_dist.model_dir"):
        assert ModelDir(tmp_path / "m").files() == [SAFE_SINGLE]
    assert "stale" not in caplog.text


def test_hub_cache_symlinks_inside_the_index_still_open(sharded, tmp_path):
    # The HF cache links snapshot files to blobs elsewhere: only the names in the index must stay inside.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in sorted(sharded.glob("*.safetensors")):
        shutil.move(f, blobs / f.name)
        f.symlink_to(blobs / f.name)
    assert ModelDir(sharded).keys()


# The tokenizer: train.py loads it with load_tokenizer, never AutoTokenizer with its defaults.


def test_load_tokenizer_reads_the_dir(base):
    tok = load_tokenizer(base)
    assert tok.eos_token_id is not None and tok("hello")["input_ids"]


def test_missing_tokenizer_is_one_line(base):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    with pytest.raises(ModelDirError, match="has no tokenizer.*copy the tokenizer files") as e:
        load_tokenizer(base)
    assert "\n" not in str(e.value)


def test_tokenizer_that_needs_remote_code_is_refused(base):
    _edit_json(base / "tokenizer_config.json", tokenizer_class="CustomTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]})
    (base / "tokenization_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelDirError, match=r"tokenizer needs code shipped in the model dir.*never runs code"):
        load_tokenizer(base)


def test_corrupt_tokenizer_is_one_line(base):
    (base / "tokenizer.json").write_bytes(b"\xff\xfe not a tokenizer")
    with pytest.raises(ModelDirError, match="cannot load the tokenizer") as e:
        load_tokenizer(base)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("archs, auto", [
    (["LlamaForCausalLM"], "AutoModelForCausalLM"),
    (["Gemma3ForConditionalGeneration"], "AutoModelForImageTextToText"),
    (["Mistral3ForConditionalGeneration"], "AutoModelForImageTextToText"),  # no causal-LM class at all
    (["Llama4ForConditionalGeneration"], "AutoModelForImageTextToText"),  # not its text-only causal LM
])
def test_the_checkpoints_own_class_is_built(archs, auto):
    import transformers as tf

    from lora_dist.model_dir import model_class

    model_type = {"Llama": "llama", "Gemma3": "gemma3", "Mistral3": "mistral3", "Llama4": "llama4"}[
        archs[0].split("For")[0]]
    config = tf.AutoConfig.for_model(model_type)
    config.architectures = archs
    cls = model_class(config)
    assert cls is getattr(tf, auto)
    assert cls._model_mapping[type(config)].__name__ == archs[0]


@pytest.mark.parametrize("model_type, arch", [("t5", "T5ForConditionalGeneration"),
                                             ("whisper", "WhisperForConditionalGeneration"),  # not its decoder alone
                                             ("bart", "BartForConditionalGeneration")])
def test_a_model_that_is_no_decoder_is_refused_in_one_line(model_type, arch):
    import transformers as tf

    from lora_dist.model_dir import model_class

    config = tf.AutoConfig.for_model(model_type)
    config.architectures = [arch]
    with pytest.raises(ModelDirError, match=f"model type '{model_type}' .* is not a language model transformers "
                                            "builds with AutoModelForCausalLM or AutoModelForImageTextToText") as e:
        model_class(config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_type, extra, recurrent, alibi", [
    ("qwen3_next", {}, "linear_attention", False), ("granitemoehybrid", {}, "linear_attention", False),
    ("nemotron_h", {}, "linear_attention", False), ("bamba", {}, "Mamba", False), ("jamba", {}, "Mamba", False),
    ("falcon_h1", {}, "Mamba", False), ("lfm2", {}, "short convolution", False), ("minimax", {}, "linear_attention", False),
    ("mamba", {}, "'mamba'", False), ("recurrent_gemma", {}, "recurrent", False),
    ("kimi_linear", {}, "linear_attention", False), ("bloom", {}, None, True), ("mpt", {}, None, True),
    ("falcon", {"alibi": True}, None, True), ("falcon", {}, None, False), ("llama", {}, None, False),
    ("gemma3_text", {}, None, False), ("gpt_oss", {}, None, False), ("llama4_text", {}, None, False),
    ("deepseek_v3", {}, None, False), ("mistral", {"sliding_window": 16}, None, False)])
def test_what_cannot_share_a_packed_block(model_type, extra, recurrent, alibi):
    """Layers that carry a state along the sequence, and ALiBi, from config.json as transformers writes it."""
    import transformers

    from lora_dist.model_dir import alibi_attention, recurrent_layers

    config = transformers.AutoConfig.for_model(model_type, **extra).to_dict()
    found = recurrent_layers(config)
    assert (found is None) if recurrent is None else (recurrent in found), found
    assert alibi_attention(config) is alibi


def test_hub_configs_without_layer_types():
    """Kimi-Linear's Hub config.json names its linear-attention layers in linear_attn_config only; MPT always
    biases with ALiBi, whether or not attn_config says so."""
    from lora_dist.model_dir import alibi_attention, recurrent_layers

    assert "linear attention" in recurrent_layers({"model_type": "kimi_linear",
                                                   "linear_attn_config": {"kda_layers": [1, 2]}})
    assert alibi_attention({"model_type": "mpt"}) and not recurrent_layers({"model_type": "mpt"})
