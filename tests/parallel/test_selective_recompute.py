"""``parallel.selective_recompute``: RMSNorms and the gated MLP product recomputed in backward.

What users care about: the same numbers (forward and every LoRA gradient bitwise
those of the plain model, in bf16 and fp32, on every gated-MLP family, with LoRA
dropout and under block checkpointing), and the memory the planner says it saves,
measured as live tensor bytes after forward.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import transformers as tf

from distutil import REPO, llama_config_dir
from lora_dist.config import load_config
from lora_dist.lora import LoRAConfig, inject_lora, lora_parameters
from lora_dist.parallel.checkpointing import _is_gated_mlp, enable_activation_checkpointing, enable_selective_recompute
from lora_dist.plan import plan_memory

SEQ = 48
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
#: Gated-MLP families: SiLU (Llama, Mistral, Qwen2) and GELU-tanh (Gemma, with its own (1 + w) RMSNorm).
FAMILIES = {
    "llama": tf.LlamaConfig(**SMALL),
    "mistral": tf.MistralConfig(**SMALL),
    "qwen2": tf.Qwen2Config(**SMALL),
    "gemma": tf.GemmaConfig(**SMALL, head_dim=16),
}


def _lora_model(config, dtype: torch.dtype, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    for q in lora_parameters(model):  # B starts at zero: give the gradients through B something to carry
        torch.nn.init.normal_(q, std=0.05)
    return model.train()


def _step(model: torch.nn.Module, ids: torch.Tensor, seed: int = 1):
    """Logits, loss and every LoRA gradient of one forward and backward."""
    torch.manual_seed(seed)  # the same dropout masks for both models
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[0])
    loss.backward()
    return logits.detach(), loss.detach(), {n: q.grad for n, q in model.named_parameters() if q.grad is not None}


def _assert_bitwise(plain, recomputed) -> None:
    assert torch.equal(plain[0], recomputed[0]) and torch.equal(plain[1], recomputed[1])
    assert plain[2].keys() == recomputed[2].keys() and len(plain[2]) > 0
    for name in plain[2]:
        assert torch.equal(plain[2][name], recomputed[2][name]), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_forward_and_gradients_are_bitwise_those_of_the_plain_model(family, dtype):
    plain = _lora_model(FAMILIES[family], dtype)
    recomputed = copy.deepcopy(plain)
    counts = enable_selective_recompute(recomputed)
    assert counts == {"norms": 2 * 2 + 1, "mlps": 2}  # two per block and the final norm; one MLP per block
    assert enable_selective_recompute(recomputed) == {"norms": 0, "mlps": 0}  # applied once
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    _assert_bitwise(_step(plain, ids), _step(recomputed, ids))


def test_lora_dropout_and_block_checkpointing_give_the_same_numbers():
    """With LoRA dropout the product is not what down_proj's LoRA keeps (its dropped-out copy is); under block
    checkpointing the checkpoint's hooks decide what is kept: both stay bitwise the plain model's."""
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    plain = _lora_model(FAMILIES["llama"], torch.bfloat16, dropout=0.1)
    recomputed = copy.deepcopy(plain)
    enable_selective_recompute(recomputed)
    _assert_bitwise(_step(plain, ids), _step(recomputed, ids))

    plain = _lora_model(FAMILIES["llama"], torch.bfloat16)
    recomputed = copy.deepcopy(plain)
    enable_selective_recompute(recomputed)
    for model in (plain, recomputed):
        enable_activation_checkpointing(model)
    _assert_bitwise(_step(plain, ids), _step(recomputed, ids))


def test_only_the_gated_mlp_forward_is_recognized():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    class Reordered(LlamaMLP):  # the same attributes, another computation
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    assert _is_gated_mlp(LlamaMLP)
    assert not _is_gated_mlp(GPT2MLP) and not _is_gated_mlp(Reordered)


def test_trainable_norms_and_no_grad_are_left_as_they_are():
    model = _lora_model(FAMILIES["llama"], torch.bfloat16)
    model.model.norm.weight.requires_grad_(True)  # a norm someone trains: it keeps its plain forward
    counts = enable_selective_recompute(model)
    assert counts == {"norms": 4, "mlps": 2}
    assert "forward" not in vars(model.model.norm) and "forward" in vars(model.model.layers[0].input_layernorm)
    with torch.no_grad():  # inference: the plain forwards run, nothing is kept
        ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
        assert model(input_ids=ids).logits.grad_fn is None


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return llama_config_dir(tmp_path_factory.mktemp("llama"), vocab=256, hidden=128, intermediate=352, layers=3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_memory_saved_is_what_the_planner_says(llama_dir, dtype):
    """Live tensor bytes after forward, with and without: the difference is the planner's, within 5%
    (bf16: 2 x hidden + 2 x MLP width elements per token and block, the norms' fp32 copies and two MLP
    tensors; fp32: the two MLP tensors)."""
    sys.path.insert(0, str(REPO))
    from lora_dist.bench.measure import LiveTensorBytes

    del sys.path[0]
    tokens = 256
    kept = {}
    for selective in (False, True):
        cfg = load_config(None, [f"model.path={llama_dir}", "parallel.strategy=none", f"model.dtype={dtype}",
                                 "lora.r=4", "lora.target_modules=all-linear", "train.micro_batch_size=1",
                                 f"train.seq_len={tokens}", f"parallel.selective_recompute={selective}"])
        model = _lora_model(tf.AutoConfig.from_pretrained(llama_dir), getattr(torch, dtype))
        if selective:
            enable_selective_recompute(model)
        ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
        tracker = LiveTensorBytes("cpu")
        with tracker:
            start = tracker.live
            hidden = model.model(input_ids=ids).last_hidden_state
            kept[selective] = (tracker.live - start, plan_memory(cfg, 1).activations)
            del hidden
    measured = kept[False][0] - kept[True][0]
    planned = kept[False][1] - kept[True][1]
    assert measured > 0.2 * kept[False][0]  # a real saving: a fifth or more of what forward keeps
    assert abs(planned / measured - 1) < 0.05, (planned, measured)
