"""Where the model's pieces live (cpu_offload), and DeepSpeed combinations refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lora_dist.config import ConfigError
from lora_dist.lora import LoRAConfig, inject_lora, lora_parameters
from lora_dist.model import base_dropout, load_model, place_unsharded
from lora_dist.parallel.deepspeed import check_supported


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("table", torch.arange(4.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_place_unsharded_moves_lora_and_buffers_only():
    """cpu_offload: base shards stay in host memory, LoRA params and buffers go to the run's device.

    The meta device stands in for a GPU: it is a device other than the CPU the shards live on.
    """
    model = WithBuffer()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["proj"]))
    place_unsharded(model, torch.device("meta"))
    assert all(p.device.type == "meta" for p in lora_parameters(model))
    assert all(b.device.type == "meta" for b in model.buffers())
    assert "scratch" not in model.state_dict()  # non-persistent stays non-persistent
    base = [p for p in model.parameters() if not p.requires_grad]
    assert base and all(p.device.type == "cpu" for p in base)
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in lora_parameters(model))


def test_zero3_with_activation_checkpointing_needs_a_fixed_deepspeed():
    with pytest.raises(ConfigError, match=r"deepspeed>=0\.19\.3.*found 0\.18\.2.*activation_checkpointing=false"):
        check_supported("zero3", True, version="0.18.2")
    check_supported("zero3", True, version="0.19.3")
    check_supported("zero3", True, version="0.20.0+abc")
    check_supported("zero3", False, version="0.15.0")
    check_supported("fsdp2", True, version="0.15.0")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("keep", [True, False])
def test_the_base_models_own_dropout_is_kept_or_turned_off(tiny_checkpoint, tmp_path, arch, keep):
    """GPT-2 ships nn.Dropout modules at 0.1, Llama-style attention a float ``attention_dropout`` handed to the
    attention kernel. ``model.base_dropout`` keeps them in training (the default, as PEFT) or sets them to 0; LoRA's
    own dropout is not the base's."""
    import json
    import shutil

    from lora_dist.config import ModelConfig, ParallelConfig

    base = tiny_checkpoint(arch)
    if arch == "llama":  # a Llama that trains with attention dropout
        base = shutil.copytree(base, tmp_path / "llama")
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.25}))
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    model = load_model(ModelConfig(path=str(base), base_dropout=keep),
                       LoRAConfig(r=2, dropout=0.1, target_modules=targets), ParallelConfig(strategy="none"),
                       torch.device("cpu"), seed=0).model
    sites = base_dropout(model)
    if keep:
        expected = ({"transformer.drop", "transformer.h.0.attn.attn_dropout", "transformer.h.0.mlp.dropout"}
                    if arch == "gpt2" else {"model.layers.0.self_attn.attention_dropout"})
        assert expected <= set(sites) and set(sites.values()) == ({0.1} if arch == "gpt2" else {0.25}), sites
    else:
        assert sites == {}
    assert not any("lora" in site for site in sites)
    assert any(m.p == 0.1 for n, m in model.named_modules() if n.endswith("lora_dropout"))  # LoRA's is kept
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    with torch.no_grad():
        for m in model.modules():  # LoRA's dropout off, to see the base's alone
            if hasattr(m, "lora_dropout"):
                m.lora_dropout.p = 0.0
        first, second = (model(input_ids=ids).logits for _ in range(2))
    assert torch.equal(first, second) != keep


@pytest.mark.parametrize("arch", ["seed_oss", "starcoder2"])
def test_float_dropout_fields_of_any_name_are_found_and_turned_off(arch):
    """Seed-OSS and StarCoder2 keep ``residual_dropout`` and ``embedding_dropout`` as plain floats handed to
    ``F.dropout`` (Seed-OSS ships 0.1): found and turned off too, with the configs' fields, so two training forwards
    agree."""
    import transformers as tf

    torch.manual_seed(0)
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, attention_dropout=0.1, residual_dropout=0.1)
    config = (tf.SeedOssConfig(head_dim=8, **sizes) if arch == "seed_oss" else
              tf.Starcoder2Config(embedding_dropout=0.1, **sizes))
    model = tf.AutoModelForCausalLM.from_config(config).train()
    x = torch.randint(0, 64, (1, 8))
    assert not torch.equal(model(x).logits, model(x).logits)
    found = base_dropout(model, turn_off=True)
    assert any(site.endswith("residual_dropout") for site in found) and set(found.values()) == {0.1}
    assert base_dropout(model) == {} and model.config.residual_dropout == 0.0
    assert torch.equal(model(x).logits, model(x).logits)


def test_layer_drop_is_base_dropout_and_refused_where_the_ranks_gather_each_layer():
    """OPT's LayerDrop skips a random whole decoder layer in training, drawn on each rank apart: under fsdp2 and
    zero3 the ranks would gather different layers (a hang), so it is refused there in one line before the model is
    built; ``model.base_dropout=false`` turns it off with the base's dropout, and ddp keeps it."""
    import transformers as tf

    from lora_dist.config import load_config
    from lora_dist.model import check_layer_drop

    torch.manual_seed(0)
    config = tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                          word_embed_proj_dim=32, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                          layerdrop=0.5)
    model = tf.AutoModelForCausalLM.from_config(config).train()
    x = torch.randint(0, 64, (1, 8))
    assert len({model(x).logits.sum().item() for _ in range(6)}) > 1  # layers skipped at random
    for strategy in ("fsdp2", "zero3"):
        cfg = load_config(None, ["model.path=x", f"parallel.strategy={strategy}"])
        with pytest.raises(ConfigError, match=rf"layerdrop=0.5 .*parallel.strategy={strategy}.*base_dropout=false"
                           ) as e:
            check_layer_drop(cfg.model, cfg.parallel.strategy, config)
        assert "\n" not in str(e.value)
    for allowed in (["parallel.strategy=ddp"], ["parallel.strategy=fsdp2", "model.base_dropout=false"]):
        cfg = load_config(None, ["model.path=x", *allowed])
        check_layer_drop(cfg.model, cfg.parallel.strategy, config)
    assert base_dropout(model, turn_off=True) == {"model.decoder.layerdrop": 0.5}
    assert model.config.layerdrop == 0.0 and len({model(x).logits.sum().item() for _ in range(3)}) == 1


def test_buffers_a_model_keeps_in_fp32_stay_fp32_under_a_bf16_base(tiny_checkpoint, tmp_path):
    """DeepSeek-V3's expert-selection bias is kept in fp32 by ``from_pretrained`` whatever the dtype
    (``_keep_in_fp32_modules_strict``); built in bf16, two biases 4e-4 apart became one (another expert fired)."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    from lora_dist.config import ModelConfig, ParallelConfig

    path = Path(shutil.copytree(tiny_checkpoint("deepseek_v3", dtype=torch.float32), tmp_path / "base"))
    tensors = load_file(str(path / "model.safetensors"))
    biases = [k for k in tensors if k.endswith("e_score_correction_bias")]
    for key in biases:
        tensors[key] = torch.linspace(0.1001, 0.1009, tensors[key].numel())
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(ModelConfig(path=str(path), dtype="bfloat16"), LoRAConfig(target_modules="all-linear"),
                       ParallelConfig(strategy="none"), torch.device("cpu"), 0).model
    reference = dict(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).named_buffers())
    ours = dict(model.named_buffers())
    assert biases
    for key in biases:
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], tensors[key]), key
        assert torch.equal(ours[key], reference[key])
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}


@pytest.mark.dist
def test_zero3_builds_the_buffers_every_other_strategy_and_from_pretrained_build(tiny_checkpoint, tmp_path):
    """DeepSpeed's zero.Init builds tensors in its dtype: under zero3 with a bf16 base, Llama's rotary ``inv_freq``,
    fp32 in transformers, came out bf16 (up to 0.5% off; a rotary angle off by radians at long positions)."""
    import transformers
    from safetensors.torch import load_file

    from distutil import ranks

    base = tiny_checkpoint("llama", hidden=64, layers=2, dtype=torch.bfloat16)
    reference = dict(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).named_buffers())
    assert reference["model.rotary_emb.inv_freq"].dtype == torch.float32
    script = str(Path(__file__).parent / "dist_scripts" / "model_buffers.py")
    for strategy in ("zero3", "fsdp2"):
        ranks(1, script, str(base), strategy, str(tmp_path / f"{strategy}.safetensors"))
        ours = load_file(str(tmp_path / f"{strategy}.safetensors"))
        assert set(ours) == set(reference), strategy
        for name, buf in ours.items():
            assert buf.dtype == reference[name].dtype and torch.equal(buf, reference[name]), (strategy, name)


def test_a_tied_embedding_stored_under_the_heads_name_loads_as_from_pretrained_loads_it(tmp_path):
    """A tied embedding is stored once, under either name: stored as ``lm_head.weight`` only, transformers loads it,
    and lora_dist refused the checkpoint ("no weights for ['model.embed_tokens.weight']")."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from lora_dist.config import ModelConfig, ParallelConfig
    from lora_dist.demo import make_tokenizer

    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    model = load_model(ModelConfig(path=str(tmp_path)), LoRAConfig(target_modules=["q_proj"]),
                       ParallelConfig(strategy="none"), torch.device("cpu"), 0).model
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert torch.equal(model.model.embed_tokens.weight, tensors["lm_head.weight"])
    x = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)


def _ernie_checkpoint(path: Path) -> Path:
    """A tiny ERNIE-4.5-MoE in bf16 whose router weight and expert-selection bias are stored in fp32 (as the Hub's
    are), the biases 1e-4 apart (one bf16 step at 0.1 is 4.9e-4)."""
    import transformers as tf

    from lora_dist.demo import make_tokenizer

    config = tf.Ernie4_5_MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32, moe_k=2,
                                   moe_num_experts=4, moe_num_shared_experts=1, moe_layer_start_index=1,
                                   moe_layer_end_index=1, tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.copy_(torch.linspace(0.1001, 0.1004, param.numel()).view_as(param))
            elif name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape) * 0.1 + 1e-3)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.dist
def test_a_router_kept_in_fp32_stays_fp32_sharded_or_not_and_deepspeed_says_it_casts(tmp_path):
    """ERNIE-4.5 keeps its router weight and expert-selection bias in fp32 whatever the dtype
    (``_keep_in_fp32_modules_strict``, parameters): one process and 2-rank fsdp2 run them in fp32, as stored;
    DeepSpeed casts the whole module to bf16, and a zero2 run says so in one line."""
    from safetensors.torch import load_file

    from distutil import ranks
    from lora_dist.model_dir import ModelDir

    base = _ernie_checkpoint(tmp_path / "ernie")
    stored = {k: ModelDir(base).read(k) for k in ModelDir(base).keys()
              if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))}
    assert len(stored) == 2 and {t.dtype for t in stored.values()} == {torch.float32}
    assert len(set(stored["model.layers.1.mlp.moe_statics.e_score_correction_bias"].flatten().tolist())) == 4
    script = str(Path(__file__).parent / "dist_scripts" / "fp32_router.py")
    for strategy, nproc in (("none", 1), ("fsdp2", 2)):
        out = tmp_path / f"{strategy}.safetensors"
        ranks(nproc, script, str(base), strategy, str(out))
        seen = load_file(str(out))
        assert torch.equal(seen["model.layers.1.mlp.gate.weight"], stored["model.layers.1.mlp.gate.weight"]), strategy
        bias = seen["model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"]
        assert torch.equal(bias, stored["model.layers.1.mlp.moe_statics.e_score_correction_bias"]), strategy
    proc = ranks(2, script, str(base), "zero2", str(tmp_path / "zero2.safetensors"))
    assert ("transformers keeps these parameters in fp32 (model.layers.1.mlp.gate.weight...), DeepSpeed "
            "(parallel.strategy=zero2) holds them in bfloat16; fsdp2 or ddp keep them in fp32") in proc.stderr
    assert load_file(str(tmp_path / "zero2.safetensors"))["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
