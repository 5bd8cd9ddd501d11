"""LoRA layers and injection, checked numerically against PEFT."""

from __future__ import annotations

import math
from collections import Counter

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_dist.lora import (
    LoRAConfig,
    LoRAConfigError,
    LoRALinear,
    disable_adapters,
    inject_lora,
    lora_modules,
    lora_parameters,
)

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# Per architecture: attention and MLP projections, so GPT-2 covers Conv1D both ways round.
TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "qwen2": ["q_proj", "k_proj", "v_proj"],  # the biased projections
    "mistral": ["q_proj", "k_proj", "gate_proj"],
    "bert": ["query", "value", "dense"],
}


def randomize_lora_B(model: nn.Module, seed: int = 0) -> None:
    """Non-zero B everywhere, so the adapter really changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def targeted_by_peft(base_model: nn.Module, **kwargs) -> set[str]:
    model = peft.get_peft_model(base_model, peft.LoraConfig(**kwargs))
    return {name.removeprefix("base_model.model.") for name in model.targeted_module_names}


def injected(model: nn.Module) -> set[str]:
    return {name for name, _ in lora_modules(model)}


# ---------------------------------------------------------------------------- forward vs PEFT


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "bert"])
def test_forward_matches_peft(arch, tiny_model, token_ids, peft_twin):
    model, base = tiny_model(arch), tiny_model(arch)
    ids = token_ids(model)
    base_logits = logits(base, ids)
    report = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS[arch]))
    randomize_lora_B(model)
    reference = peft_twin(base, model)

    assert injected(model) == {n.removeprefix("base_model.model.") for n in reference.targeted_module_names}
    assert set(report.matched) == injected(model)
    ours, theirs = logits(model, ids), logits(reference, ids)
    assert (ours - base_logits).abs().max() > 1e-3, "the adapter did not change the output"
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_conv1d_layers_are_fan_in_fan_out(tiny_model):
    model = tiny_model("gpt2")
    inject_lora(model, LoRAConfig(r=4, target_modules=["c_attn", "c_fc"]))
    for name, layer in lora_modules(model):
        assert layer.fan_in_fan_out
        assert layer.weight.shape == (layer.in_features, layer.out_features), name
        assert layer.lora_A.weight.shape == (4, layer.in_features)
        assert layer.lora_B.weight.shape == (layer.out_features, 4)


def test_dropout_matches_peft_in_train_mode(tiny_model, token_ids, peft_twin):
    model, base = tiny_model("llama"), tiny_model("llama")
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model)
    reference = peft_twin(base, model, lora_dropout=0.3)
    ids = token_ids(model)
    model.train(), reference.train()
    torch.manual_seed(1)
    ours = model(input_ids=ids).logits
    torch.manual_seed(1)
    theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- starts as the base model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_B_gives_base_outputs_exactly(arch, init, tiny_model, token_ids):
    model, base = tiny_model(arch), tiny_model(arch)
    ids = token_ids(model)
    inject_lora(model, LoRAConfig(r=4, init=init, target_modules=TARGETS[arch]))
    for _, layer in lora_modules(model):
        assert layer.lora_A.weight.abs().sum() > 0
        assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
    assert torch.equal(logits(model, ids), logits(base, ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disable_adapters_gives_base_outputs(arch, tiny_model, token_ids):
    model, base = tiny_model(arch), tiny_model(arch)
    ids = token_ids(model)
    inject_lora(model, LoRAConfig(r=4, target_modules=TARGETS[arch]))
    randomize_lora_B(model)
    adapted = logits(model, ids)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(base, ids))
    assert torch.equal(logits(model, ids), adapted)

    with pytest.raises(RuntimeError), disable_adapters(model):
        raise RuntimeError("boom")
    assert not any(layer.disabled for _, layer in lora_modules(model)), "disabled flag leaked past the context"


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_lora_params_receive_gradients(arch, tiny_model, token_ids):
    model = tiny_model(arch)
    report = inject_lora(model, LoRAConfig(r=4, target_modules=TARGETS[arch]))
    randomize_lora_B(model)
    model.train()
    ids = token_ids(model)
    model(input_ids=ids, labels=ids).loss.backward()

    lora_ids = {id(p) for p in lora_parameters(model)}
    assert len(lora_ids) == 2 * len(report.matched)
    for name, param in model.named_parameters():
        if id(param) in lora_ids:
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad, name
            assert param.grad is None, name
    assert report.trainable_params == sum(p.numel() for p in lora_parameters(model))
    assert report.all_params == sum(p.numel() for p in model.parameters())


def test_lora_parameters_follow_module_order(tiny_model):
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert [by_id[id(p)] for p in lora_parameters(model)] == names


# ---------------------------------------------------------------------------- scaling and init


def test_rslora_matches_peft(tiny_model, token_ids, peft_twin):
    model, base = tiny_model("llama"), tiny_model("llama")
    inject_lora(model, LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]))
    for _, layer in lora_modules(model):
        assert layer.scale == pytest.approx(8 / math.sqrt(4))
    randomize_lora_B(model)
    reference = peft_twin(base, model, use_rslora=True)
    for name, layer in lora_modules(model):
        twin = reference.base_model.model.get_submodule(name)
        assert twin.scaling["default"] == pytest.approx(layer.scale)
    ids = token_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)


def test_gaussian_init_std_is_one_over_r():
    base = nn.Linear(512, 256)
    layer = LoRALinear.from_base(base, r=8, alpha=16, init="gaussian")
    a = layer.lora_A.weight
    assert a.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert a.mean().abs().item() < 0.01
    assert torch.equal(layer.lora_B.weight, torch.zeros(256, 8))


def test_kaiming_init_matches_torch_bound():
    layer = LoRALinear.from_base(nn.Linear(512, 256), r=8, alpha=16)
    reference = torch.empty(8, 512)
    nn.init.kaiming_uniform_(reference, a=math.sqrt(5))
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) bound: gain * sqrt(3 / fan_in)
    a = layer.lora_A.weight
    assert a.abs().max().item() <= bound
    assert a.abs().max().item() > 0.95 * bound
    assert a.std().item() == pytest.approx(reference.std().item(), rel=0.1)


def test_initialize_parameters_is_reproducible_with_a_generator():
    layer = LoRALinear.from_base(nn.Linear(32, 16), r=4, alpha=8)
    layer.initialize_parameters(torch.Generator().manual_seed(3))
    first = layer.lora_A.weight.clone()
    layer.lora_B.weight.data.fill_(1.0)
    layer.initialize_parameters(torch.Generator().manual_seed(3))
    assert torch.equal(layer.lora_A.weight, first)
    assert torch.equal(layer.lora_B.weight, torch.zeros(16, 4))


def test_lora_params_stay_fp32_on_a_bf16_base(tiny_model, token_ids):
    model = tiny_model("llama").to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    for _, layer in lora_modules(model):
        assert layer.weight.dtype == torch.bfloat16
        assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    randomize_lora_B(model)
    assert logits(model, token_ids(model)).dtype == torch.bfloat16


def saved_for_backward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Counter]:
    """The layer's output and the (dtype, shape) of every tensor autograd saved for its backward."""
    saved: Counter = Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[(tensor.dtype, tuple(tensor.shape))] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    return out, saved


def test_bf16_lora_path_saves_no_fp32_copy_of_its_input():
    torch.manual_seed(0)
    layer = LoRALinear.from_base(nn.Linear(64, 96, dtype=torch.bfloat16), r=8, alpha=16, dropout=0.1)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(1)
    out, saved = saved_for_backward(layer, x)
    layer.disabled = True
    _, saved_by_base = saved_for_backward(layer, x)
    layer.disabled = False

    lora_path = saved - saved_by_base
    assert lora_path, "nothing saved by the LoRA path: the test measures nothing"
    params = {(p.dtype, tuple(p.shape)) for p in (layer.lora_A.weight, layer.lora_B.weight)}  # by reference
    activations = {key for key in lora_path if key not in params}
    assert {dtype for dtype, _ in activations} == {torch.bfloat16}, f"LoRA path saved {dict(lora_path)}"
    assert (torch.float32, tuple(x.shape)) not in saved
    assert out.dtype == torch.bfloat16

    out.float().square().sum().backward()
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        assert p.dtype == p.grad.dtype == torch.float32

    # The same layer in fp32 (same dropout mask: same seed, same shape).
    reference = LoRALinear.from_base(nn.Linear(64, 96), r=8, alpha=16, dropout=0.1)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(dict(layer.named_parameters())[name].float())
    x32 = x.detach().float().requires_grad_(True)
    torch.manual_seed(1)
    expected = reference(x32)
    expected.square().sum().backward()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    for name in ("lora_A.weight", "lora_B.weight"):
        ours, theirs = layer.get_parameter(name).grad, reference.get_parameter(name).grad
        torch.testing.assert_close(ours, theirs, rtol=5e-2, atol=5e-2 * theirs.abs().max().item())


def test_fp32_forward_is_the_fp32_lora_formula_bit_for_bit():
    torch.manual_seed(0)
    layer = LoRALinear.from_base(nn.Linear(64, 96), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16, 64)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias) + layer.lora_B(layer.lora_A(x)) * layer.scale
    assert torch.equal(layer(x), expected)


def run_layer(layer: nn.Module, x: torch.Tensor, fused: bool, grad: torch.Tensor | None = None):
    """The layer's output and the grads of ``x``, ``lora_A`` and ``lora_B``, computed by the fused autograd
    function (``fused``) or by separate autograd ops."""
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    plain = type(layer)._fusable
    layer._fusable = plain.__get__(layer) if fused else (lambda *args: False)
    try:
        out = layer(x)
    finally:
        del layer._fusable
    assert (type(out.grad_fn).__name__ == "_LoRALinearFunctionBackward") == fused
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)) if grad is None else grad)
    return out.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_layer_is_the_separate_ops_bit_for_bit_in_fp32(bias, conv1d):
    """One autograd node per adapted layer (update accumulated by the base's matmul, input gradients by the
    base's backward matmul): output and every gradient exactly those of the layer as separate ops."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if conv1d:
        base = Conv1D(96, 64)
        if not bias:
            base.bias = None
    else:
        base = nn.Linear(64, 96, bias=bias)
    layer = LoRALinear.from_base(base, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16, 64, requires_grad=True)
    fused, separate = run_layer(layer, x, True), run_layer(layer, x, False)
    for got, want in zip(fused, separate):
        assert torch.equal(got, want)


def test_fused_layer_in_bf16_keeps_fp32_lora_grads_and_no_more_activations():
    torch.manual_seed(0)
    layer = LoRALinear.from_base(nn.Linear(64, 96, dtype=torch.bfloat16), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    fused, separate = run_layer(layer, x, True), run_layer(layer, x, False)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    # The fused matmul rounds the sum once (the separate ops round base and update, then their sum).
    for got, want in zip(fused, separate):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1.6e-2 * want.abs().max().item())

    def saved_bytes(fused: bool) -> int:
        layer._fusable = (lambda *args: fused)
        try:
            _, saved = saved_for_backward(layer, x)
        finally:
            del layer._fusable
        return sum(n * math.prod(shape) * dtype.itemsize for (dtype, shape), n in saved.items()
                   if shape != tuple(layer.weight.shape))  # the weight is saved by reference either way

    assert saved_bytes(True) <= saved_bytes(False)


def test_fused_layer_on_an_nf4_base_is_the_separate_ops():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    torch.manual_seed(0)
    base = nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
    layer = LoRALinear.from_base(base, r=8, alpha=16)
    layer.weight = nn.Parameter(to_nf4(base.weight.detach()), requires_grad=False)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16, requires_grad=True)
    fused, separate = run_layer(layer, x, True), run_layer(layer, x, False)
    for got, want in zip(fused, separate):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1.6e-2 * want.abs().max().item())


def test_autocast_runs_the_separate_ops_and_dropout_the_fused_layer():
    layer = LoRALinear.from_base(nn.Linear(64, 96), r=8, alpha=16, dropout=0.1)
    x = torch.randn(4, 64, requires_grad=True)
    assert layer._fusable(x, layer.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._fusable(x, layer.weight)
        assert layer(x).dtype == torch.bfloat16


def dropout_layer(dtype: torch.dtype) -> tuple[LoRALinear, torch.Tensor]:
    """A layer with dropout 0.3 and a nonzero B (so the mask shows in every gradient), and its input."""
    torch.manual_seed(0)
    layer = LoRALinear.from_base(nn.Linear(64, 96, dtype=dtype), r=8, alpha=16, dropout=0.3)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer, torch.randn(4, 16, 64, dtype=dtype, requires_grad=True)


def assert_fused_is_separate(fused, separate, dtype: torch.dtype) -> None:
    """Bit for bit in fp32; in bf16 one rounding of the sum apart (see the bf16 test above)."""
    for got, want in zip(fused, separate):
        if dtype == torch.float32:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_with_dropout_is_the_separate_ops(dtype):
    """Same generator state, same mask: the fused layer draws it as nn.Dropout does, and its backward sends the
    LoRA path's input gradient through that mask (and 1 / (1 - p)); in eval mode no dropout at all."""
    layer, x = dropout_layer(dtype)
    torch.manual_seed(7)
    fused = run_layer(layer, x, True)
    torch.manual_seed(7)
    assert_fused_is_separate(fused, run_layer(layer, x, False), dtype)
    torch.manual_seed(8)
    other = run_layer(layer, x, True)
    assert not torch.equal(other[2], fused[2]), "another mask must give another lora_A gradient"
    layer.eval()
    evaluated = run_layer(layer, x, True)
    layer.lora_dropout = nn.Identity()
    without = run_layer(layer, x, True)
    for got, want in zip(evaluated, without):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_draws_dropout_with_torchs_fused_kernel_where_f_dropout_does(monkeypatch, dtype):
    """On CUDA ``F.dropout`` is ``native_dropout`` (torch's fused kernel, its own mask from the generator): there the
    fused layer calls that kernel too, keeps its bool mask, and goes back through ``native_dropout_backward``. Here
    the CPU stands in for CUDA: the layer against separate ops whose dropout is that kernel."""
    import lora_dist.lora

    class FusedKernelDropout(nn.Module):  # what nn.Dropout computes on CUDA
        def forward(self, x):
            return torch.native_dropout(x, 0.3, True)[0]

    monkeypatch.setattr(lora_dist.lora, "_FUSED_DROPOUT_DEVICES", ("cpu",))
    layer, x = dropout_layer(dtype)
    torch.manual_seed(7)
    fused = run_layer(layer, x, True)
    layer.lora_dropout = FusedKernelDropout()
    torch.manual_seed(7)
    assert_fused_is_separate(fused, run_layer(layer, x, False), dtype)
    torch.manual_seed(7)
    _, noise, mask = lora_dist.lora._dropout(x.detach().reshape(-1, 64), 0.3)
    assert noise is None and mask.dtype == torch.bool  # one byte per element kept for backward
    assert 0.6 < mask.float().mean() < 0.8


# ---------------------------------------------------------------------------- which modules get adapted


def test_default_targets_are_query_and_value(tiny_model):
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2))
    assert injected(model) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    gpt2 = tiny_model("gpt2")
    inject_lora(gpt2, LoRAConfig(r=2))
    assert injected(gpt2) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_all_linear_excludes_output_head_like_peft(arch, tiny_model):
    model = tiny_model(arch)
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    names = injected(model)
    head = {"llama": "lm_head", "gpt2": "lm_head", "bert": "cls.predictions.decoder"}[arch]
    assert head not in names
    assert not isinstance(model.get_output_embeddings(), LoRALinear)
    assert names == targeted_by_peft(tiny_model(arch), r=2, target_modules="all-linear", fan_in_fan_out=arch == "gpt2")


def test_layers_to_transform_like_peft(tiny_model):
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert injected(model) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert injected(model) == targeted_by_peft(
        tiny_model("llama"), r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]
    )
    gpt2 = tiny_model("gpt2")
    inject_lora(gpt2, LoRAConfig(r=2, target_modules=["c_attn"], layers_to_transform=0))
    assert injected(gpt2) == {"transformer.h.0.attn.c_attn"}


def test_regex_targets_like_peft(tiny_model):
    pattern = r"model\.layers\.0\.(self_attn\.(q|k)_proj|mlp\.up_proj)"
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules=pattern))
    assert injected(model) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.up_proj",
    }
    assert injected(model) == targeted_by_peft(tiny_model("llama"), r=2, target_modules=pattern)


@pytest.mark.parametrize("exclude", [["mlp.down_proj", "o_proj"], r".*\.1\..*|.*down_proj"])
def test_exclude_modules_like_peft(exclude, tiny_model):
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear", exclude_modules=exclude))
    names = injected(model)
    assert names and not any(n.endswith(("down_proj",)) for n in names)
    assert names == targeted_by_peft(tiny_model("llama"), r=2, target_modules="all-linear", exclude_modules=exclude)


def test_rank_and_alpha_pattern_match_peft(tiny_model, token_ids):
    config = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    patterns = dict(rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 8}, alpha_pattern={"q_proj": 32.0})
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(alpha=8, **config, **patterns))
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(lora_alpha=8, **config, **patterns)).eval()
    randomize_lora_B(model)
    with torch.no_grad():
        for name, layer in lora_modules(model):
            twin = reference.base_model.model.get_submodule(name)
            assert layer.r == twin.r["default"], name
            assert layer.scale == pytest.approx(twin.scaling["default"]), name
            twin.lora_A["default"].weight.copy_(layer.lora_A.weight)
            twin.lora_B["default"].weight.copy_(layer.lora_B.weight)
    layers = dict(lora_modules(model))
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.1.mlp.down_proj"].r == 8
    assert layers["model.layers.0.mlp.down_proj"].r == 4
    assert layers["model.layers.0.self_attn.q_proj"].scale == pytest.approx(32 / 4)
    ids = token_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- meta-device init


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_meta_injection_loads_base_checkpoint_unchanged(arch, tiny_checkpoint, tiny_model, token_ids):
    import transformers

    path = tiny_checkpoint(arch)
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    inject_lora(model, LoRAConfig(r=4, target_modules=TARGETS[arch]))
    assert all(p.is_meta for p in lora_parameters(model))

    model.to_empty(device="cpu")
    base_state = load_file(str(path / "model.safetensors"))
    result = model.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == []
    missing = set(result.missing_keys) - {"lm_head.weight"}  # GPT-2 ties lm_head to wte; it is not saved
    lora_keys = {k for k in model.state_dict() if ".lora_A." in k or ".lora_B." in k}
    assert missing == lora_keys
    model.tie_weights()
    for _, layer in lora_modules(model):
        layer.initialize_parameters()

    reference = tiny_model(arch)
    with torch.no_grad():  # non-persistent buffers (RoPE inv_freq...) are not in a checkpoint
        for name, buffer in reference.named_buffers():
            model.get_buffer(name).copy_(buffer)
    state = model.state_dict()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(state[key], tensor), key
    model.eval()
    ids = token_ids(model)
    assert torch.equal(logits(model, ids), logits(reference, ids))

    # The base checkpoint plus LoRA tensors is exactly the injected model's state dict.
    full = {**base_state, **{k: v for k, v in state.items() if k in lora_keys}}
    if "lm_head.weight" not in base_state:
        full["lm_head.weight"] = base_state["transformer.wte.weight"]
    model.load_state_dict(full, strict=True)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(LoRAConfigError, match="lora.r"):
        LoRAConfig(r=r)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0), "lora.alpha"),
        (dict(alpha=math.nan), "lora.alpha"),
        (dict(alpha=math.inf), "lora.alpha"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(dropout=math.nan), "lora.dropout"),
        (dict(dropout=None), "lora.dropout"),
        (dict(dropout="0.1"), "lora.dropout"),
        (dict(use_rslora="yes"), "lora.use_rslora"),
        (dict(use_rslora=1), "lora.use_rslora"),
        (dict(init="orthogonal"), "lora.init"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(target_modules=[]), "lora.target_modules"),
        (dict(exclude_modules="all-linear"), "exclude_modules"),
        (dict(layers_to_transform=[-1]), "layers_to_transform"),
        (dict(layers_to_transform=[True]), "layers_to_transform"),
        (dict(layers_to_transform=True), "layers_to_transform"),
        (dict(layers_to_transform=1.5), "layers_to_transform"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(rank_pattern=[1]), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": -1.0}), "alpha_pattern"),
        (dict(alpha_pattern={"q_proj": math.nan}), "alpha_pattern"),
        (dict(alpha_pattern={"(": 2.0}), r"lora.alpha_pattern key '\(' is not a valid regex"),  # issue 15
        (dict(rank_pattern={"v_proj)": 2}), r"lora.rank_pattern key 'v_proj\)' is not a valid regex"),
        (dict(rank_pattern={3: 2}), "keys must be module-name regexes"),
        (dict(target_modules="(" * 10_000), "not a valid regex: nested or repeated too deeply"),
        (dict(rank_pattern={"(" * 10_000: 2}), "not a valid regex .nested or repeated too deeply"),
        (dict(target_modules=[""] + ["x" * 10_000] * 10_000), r"lora.target_modules must be .* got \[''"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(LoRAConfigError, match=match) as err:
        LoRAConfig(**kwargs)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600  # values are shown as short excerpts


def test_a_rank_above_a_layers_smaller_side_adapts_it_as_peft_does(tiny_model, token_ids, peft_twin, tmp_path):
    """PEFT takes r > min(in, out) (``all-linear`` on Qwen2-MoE or Qwen3-Next reaches their hidden->1
    ``shared_expert_gate``), so lora_dist does too: the same outputs, the same adapter both ways, the same merge."""
    from lora_dist.adapter import load_adapter, save_adapter
    from lora_dist.merge import merge_state_dict

    model = tiny_model("llama")  # hidden 32, 2 kv heads of 8: k_proj/v_proj are 32 -> 16
    inject_lora(model, LoRAConfig(r=24, alpha=8, target_modules=["v_proj", "q_proj"]))
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert (layer.in_features, layer.out_features, layer.r) == (32, 16, 24)
    assert layer.lora_A.weight.shape == (24, 32) and layer.lora_B.weight.shape == (16, 24)
    randomize_lora_B(model)
    ids = token_ids(model)
    reference = peft_twin(tiny_model("llama"), model)
    ours = logits(model, ids)
    torch.testing.assert_close(ours, logits(reference, ids), atol=1e-6, rtol=0)

    save_adapter(model, tmp_path / "ours")  # ours -> PEFT -> ours
    again = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(again, ids), ours, atol=1e-6, rtol=0)
    reference.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(logits(load_adapter(tiny_model("llama"), tmp_path / "peft"), ids), ours,
                               atol=1e-5, rtol=0)

    base = tiny_model("llama")
    adapters = {name: lora.lora_weights() for name, lora in lora_modules(model)}
    base.load_state_dict(merge_state_dict(base.state_dict(), adapters))
    torch.testing.assert_close(logits(base, ids), ours, atol=1e-5, rtol=0)
    with pytest.raises(LoRAConfigError, match=r"lora\.r=0 must be at least 1"):
        LoRALinear.from_base(nn.Linear(4, 1), r=0, alpha=1)


def test_targets_matching_nothing_list_the_linear_layers(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(LoRAConfigError, match="matched no linear layer") as err:
        inject_lora(model, LoRAConfig(r=2, target_modules=["query", "c_attn"]))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in str(err.value)
    with pytest.raises(LoRAConfigError, match="c_attn"):
        inject_lora(tiny_model("gpt2"), LoRAConfig(r=2, target_modules=r"q_proj"))


@pytest.mark.parametrize(("arch", "kwargs", "message"), [
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[5]),
     "lora.target_modules=['q_proj', 'v_proj'] matched 4 linear layers, but lora.layers_to_transform=[5] keeps none "
     "of them (they lie in layers 0, 1); choose lora.layers_to_transform among 0, 1 or drop it"),
    ("llama", dict(target_modules=["q_proj"], exclude_modules=["q_proj"]),
     "lora.target_modules=['q_proj'] matched 2 linear layers, but lora.exclude_modules entry q_proj removes "
     "model.layers.0.self_attn.q_proj and 1 more; drop q_proj from lora.exclude_modules"),
    ("llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=["k_proj", "q_proj"], layers_to_transform=[3]),
     "lora.target_modules=['q_proj', 'v_proj'] matched 4 linear layers, but lora.exclude_modules entry q_proj removes "
     "model.layers.0.self_attn.q_proj and 1 more; lora.layers_to_transform=[3] keeps none of the rest (they lie in "
     "layers 0, 1); drop q_proj from lora.exclude_modules, and choose lora.layers_to_transform among 0, 1 or drop it"),
    ("qwen3_moe", dict(target_parameters=["mlp.experts.gate_up_proj"], layers_to_transform=[7]),
     "lora.target_parameters=['mlp.experts.gate_up_proj'] matched 2 parameters, but lora.layers_to_transform=[7] "
     "keeps none of them (they lie in layers 0, 1); choose lora.layers_to_transform among 0, 1 or drop it"),
    ("qwen3_moe", dict(target_parameters=["mlp.experts.gate_up_proj"], exclude_modules=["experts"]),
     "lora.target_parameters=['mlp.experts.gate_up_proj'] matched 2 parameters, but lora.exclude_modules entry "
     "experts removes model.layers.0.mlp.experts and 1 more; drop experts from lora.exclude_modules"),
    ("llama", dict(target_modules="q_proj"),
     "lora.target_modules='q_proj' matched no linear layer; a string is a regex on full module names; write "
     "lora.target_modules=[q_proj] (a list of names)"),
])
def test_targets_filtered_to_nothing_name_the_filter(tiny_model, arch, kwargs, message):
    """Matches that exclude_modules or layers_to_transform removed are blamed on that filter, with the model's
    layer indices; a single name given as a string is told apart from a name list."""
    with pytest.raises(LoRAConfigError) as err:
        inject_lora(tiny_model(arch), LoRAConfig(r=2, **kwargs))
    assert str(err.value) == message


def test_injecting_twice_is_an_error(tiny_model):
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2))
    with pytest.raises(LoRAConfigError, match="twice"):
        inject_lora(model, LoRAConfig(r=2))


def test_unknown_architecture_needs_explicit_targets():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(LoRAConfigError, match="target_modules"):
        inject_lora(model, LoRAConfig(r=2))
    report = inject_lora(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    assert report.matched == ["0", "2"]
    trainable = sum(p.numel() for p in lora_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    assert report.summary() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


# ----------------------------------------------------------------------------- target_parameters (LoRAParam)


class _Stack(nn.Module):
    """Experts fused as ``(E, out, in)``, or ``(E, in, out)`` with ``is_transposed``; plus a 2-D ``proj``."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.is_transposed = transposed
        self.weight = nn.Parameter(torch.randn((3, 6, 5) if transposed else (3, 5, 6), generator=generator))
        self.proj = nn.Parameter(torch.randn(4, 5, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (E, tokens, 6)
        w = self.weight if self.is_transposed else self.weight.transpose(1, 2)
        return torch.bmm(x, w) @ self.proj.T


class _Host(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.experts = _Stack(transposed)

    def forward(self, x):
        return self.experts(x)


@pytest.mark.parametrize("transposed", [False, True])
def test_lora_param_forward_and_grads_equal_peft(transposed):
    """A 3-D stack in either layout and a 2-D weight on the same module: PEFT's nested ParamWrappers."""
    from lora_dist.adapter import peft_names

    targets = ["experts.weight", "experts.proj"]
    ours = _Host(transposed)
    inject_lora(ours, LoRAConfig(r=2, alpha=3, target_parameters=targets))
    twin = peft.get_peft_model(_Host(transposed), peft.LoraConfig(r=2, lora_alpha=3, target_parameters=targets))
    theirs = dict(twin.named_parameters())
    names = peft_names(ours)
    assert names == {"experts.lora.weight": "experts.base_layer", "experts.lora.proj": "experts"}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora_modules(ours):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))
            for part in ("lora_A", "lora_B"):
                theirs[f"base_model.model.{names[name]}.{part}.default.weight"].copy_(getattr(layer, part).weight)
    x = torch.randn(3, 4, 6, generator=generator)
    out, ref = ours(x), twin(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)
    assert (out - _Host(transposed)(x)).abs().max() > 1e-2
    out.square().sum().backward()
    ref.square().sum().backward()
    for name, layer in lora_modules(ours):
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, part).weight.grad,
                                       theirs[f"base_model.model.{names[name]}.{part}.default.weight"].grad,
                                       atol=1e-4, rtol=1e-5)
    # The base params keep their names and stay frozen; the host's forward puts them back after each call.
    assert isinstance(ours.experts.weight, nn.Parameter) and not ours.experts.weight.requires_grad
    assert {n for n, p in ours.named_parameters() if not p.requires_grad} == {"experts.weight", "experts.proj"}


def test_linear_subclasses_are_adapted_only_where_their_forward_is_the_projection():
    """Falcon's ``FalconLinear`` (its own forward, ``x @ W.T + b``) is adapted, to PEFT's outputs; Llama 4's router,
    a Linear whose forward returns the routing too, is not (LoRA's forward would replace it), and a target naming
    only such layers says so."""
    import transformers as tf
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    import copy

    torch.manual_seed(0)
    config = tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             new_decoder_architecture=False, multi_query=True)
    model = tf.FalconForCausalLM(config).eval()
    targets = ["query_key_value", "dense_4h_to_h"]
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    ours = dict(lora_modules(model))
    assert {n.rsplit(".", 1)[-1] for n in ours} == set(targets)
    theirs = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(theirs) == set(ours)
    with torch.no_grad():
        for name, layer in ours.items():
            theirs[name].lora_B["default"].weight.normal_(0, 0.1)
            layer.lora_A.weight.copy_(theirs[name].lora_A["default"].weight)
            layer.lora_B.weight.copy_(theirs[name].lora_B["default"].weight)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)

    router_config = tf.Llama4TextConfig(hidden_size=16, num_local_experts=4, num_experts_per_tok=1)
    moe = nn.Module()
    moe.router, moe.proj = Llama4Router(router_config), nn.Linear(16, 16)
    inject_lora(moe, LoRAConfig(r=2, target_modules="all-linear"))
    assert [n for n, _ in lora_modules(moe)] == ["proj"]
    with pytest.raises(LoRAConfigError, match=r"matched no linear layer; .*Linear subclasses with a forward of their "
                                              r"own are not adapted: \['router'\]"):
        holder = nn.Module()
        holder.router = Llama4Router(router_config)
        inject_lora(holder, LoRAConfig(r=2, target_modules=["router"]))


@pytest.mark.parametrize("model_type, skipped", [("bamba", {"out_proj"}), ("jamba", {"dt_proj"}),
                                                 ("mamba", {"out_proj", "x_proj", "dt_proj"})])
def test_all_linear_leaves_out_what_a_mamba_mixer_reads_by_weight(model_type, skipped, caplog):
    """A Mamba-2 mixer hands out_proj's weight to its fused scan kernel on GPUs (Mamba 1: x_proj's and dt_proj's too;
    Jamba multiplies by dt_proj's everywhere): LoRA there has no effect in that path. all-linear leaves exactly
    those out (Jamba calls its x_proj and out_proj: they are adapted); naming one adapts it, with a warning (an
    adapter trained before, or by PEFT, still loads)."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    mixers = {name.rpartition(".")[0] for name, m in model.named_modules() if name.endswith(".conv1d")}
    linears = {c for mixer in mixers for c, sub in model.get_submodule(mixer).named_children()
               if isinstance(sub, nn.Linear)}
    assert mixers and skipped < linears
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for mixer in mixers:
        assert {f"{mixer}.{c}" for c in linears} & adapted == {f"{mixer}.{c}" for c in linears - skipped}
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    with caplog.at_level("WARNING", logger="lora_dist.lora"):
        inject_lora(model, LoRAConfig(r=4, target_modules=sorted(linears)))
    assert "uses its weight directly in some path" in caplog.text
    assert f"lora.exclude_modules=[{','.join(sorted(skipped))}]" in caplog.text
    assert {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)} == linears
