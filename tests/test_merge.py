"""Merging adapters into base weights, against PEFT's ``merge_and_unload``."""

from __future__ import annotations

import dataclasses
import math

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_dist.lora import LoRAConfig, LoRALinear, disable_adapters, inject_lora, lora_modules
from lora_dist.merge import (
    LoRAWeights,
    MergeError,
    lora_delta,
    lora_scale,
    merge_state_dict,
    merge_weight,
    unmerge_weight,
)

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def adapted(tiny_model, arch: str, seed: int = 0, **config) -> nn.Module:
    """A tiny model with LoRA on ``TARGETS[arch]`` and random non-zero A and B."""
    model = tiny_model(arch)
    inject_lora(model, LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": TARGETS[arch], **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}


# ---------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_matches_peft_merge_and_unload(arch, use_rslora, tiny_model, token_ids, peft_twin):
    model = adapted(tiny_model, arch, use_rslora=use_rslora)
    merged_by_peft = peft_twin(tiny_model(arch), model).merge_and_unload(safe_merge=True)
    ids = token_ids(model)
    for _, layer in lora_modules(model):
        layer.merge()
        assert layer.merged

    ours, theirs = base_state(model), merged_by_peft.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(logits(model, ids), logits(merged_by_peft, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_state_dict_of_a_checkpoint_matches_peft(arch, tiny_checkpoint, tiny_model, token_ids, peft_twin):
    model = adapted(tiny_model, arch, rank_pattern={"v_proj|c_fc": 2}, alpha_pattern={"c_attn|down_proj": 3.0})
    merged_by_peft = peft_twin(tiny_model(arch), model).merge_and_unload()
    checkpoint = load_file(str(tiny_checkpoint(arch) / "model.safetensors"))
    adapters = {name: layer.lora_weights() for name, layer in lora_modules(model)}

    merged = merge_state_dict(checkpoint, adapters)
    assert merged.keys() == checkpoint.keys()
    expected = merged_by_peft.state_dict()
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-6, rtol=0, msg=key)

    fresh = tiny_model(arch)
    fresh.load_state_dict(merged, strict=False)
    fresh.tie_weights()
    ids = token_ids(fresh)
    torch.testing.assert_close(logits(fresh, ids), logits(merged_by_peft, ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- merge / unmerge in place


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_forward_equals_adapter_forward_and_unmerge_restores(arch, tiny_model, token_ids):
    model = adapted(tiny_model, arch)
    before_weights, ids = base_state(model), token_ids(model)
    before = logits(model, ids)
    for _, layer in lora_modules(model):
        layer.merge()
        layer.merge()  # idempotent
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)

    for _, layer in lora_modules(model):
        layer.unmerge()
        layer.unmerge()
        assert not layer.merged
    for key, tensor in base_state(model).items():
        torch.testing.assert_close(tensor, before_weights[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)


def test_disable_adapters_on_a_merged_model_gives_base_outputs(tiny_model, token_ids):
    model, base = adapted(tiny_model, "llama"), tiny_model("llama")
    ids = token_ids(model)
    adapted_logits = logits(model, ids)
    for _, layer in lora_modules(model):
        layer.merge()
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-6, rtol=0)
    assert all(layer.merged for _, layer in lora_modules(model))
    torch.testing.assert_close(logits(model, ids), adapted_logits, atol=1e-5, rtol=0)


def test_merge_refuses_non_finite_results():
    layer = LoRALinear.from_base(nn.Linear(16, 8), r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.weight.fill_(1.0)
        layer.lora_A.weight[0, 3] = float("inf")
    weight = layer.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN/Inf"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.weight, weight), "a refused merge changed the weight"

    lora = LoRAWeights(torch.ones(2, 16), torch.ones(8, 2), 1.0)
    corrupt = torch.zeros(8, 16)
    corrupt[1, 1] = float("nan")
    with pytest.raises(MergeError, match="NaN/Inf"):
        merge_weight(corrupt, lora)
    with pytest.raises(MergeError, match="NaN/Inf"):  # fp32 overflow is caught too
        merge_weight(torch.full((8, 16), 3e38), LoRAWeights(lora.lora_A, lora.lora_B, 1e38))


def test_merge_refuses_non_float_tensors():
    # Issue 15: int8 adapter tensors made a silent no-op merge; an int base would be merged into garbage.
    lora = LoRAWeights(torch.ones(2, 16), torch.ones(8, 2), 1.0)
    with pytest.raises(MergeError, match="LoRA tensors must be floating point"):
        merge_weight(torch.zeros(8, 16), LoRAWeights(lora.lora_A.to(torch.int8), lora.lora_B.to(torch.int8), 1.0))
    with pytest.raises(MergeError, match=r"cannot merge into a torch.int8 weight"):
        merge_weight(torch.zeros(8, 16, dtype=torch.int8), lora)
    with pytest.raises(MergeError, match=r"as torch.int32"):
        merge_weight(torch.zeros(8, 16), lora, out_dtype=torch.int32)
    with pytest.raises(MergeError, match=r"not \(r, in\) and \(out, r\)"):  # a 1-D lora_A
        lora_delta(torch.ones(32), torch.ones(8, 2), 1.0)


def test_merge_refuses_a_result_that_overflows_the_output_dtype():
    # Finite in fp32, Inf in fp16: checked after the cast, named, with the fix.
    lora = LoRAWeights(torch.ones(2, 16), torch.ones(8, 2), 1e5)  # 2e5 > 65504
    with pytest.raises(MergeError, match="w: the merged weight overflows float16.*float32 or bfloat16"):
        merge_weight(torch.zeros(8, 16), lora, out_dtype=torch.float16, name="w")
    assert merge_weight(torch.zeros(8, 16), lora, out_dtype=torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- pure functions


def test_lora_delta_is_scaled_B_times_A():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 10, generator=generator), torch.randn(6, 3, generator=generator)
    expected = 0.5 * (b.double() @ a.double())
    torch.testing.assert_close(lora_delta(a, b, 0.5).double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora_delta(a, b, 0.5, fan_in_fan_out=True).double(), expected.T, atol=1e-6, rtol=0)
    assert lora_delta(a.bfloat16(), b.bfloat16(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_row_shards_merge_to_the_full_merge(fan_in_fan_out):
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 12, generator=generator), torch.randn(10, 4, generator=generator)
    lora = LoRAWeights(a, b, 2.0, fan_in_fan_out)
    weight = torch.randn((12, 10) if fan_in_fan_out else (10, 12), generator=generator)
    full = merge_weight(weight, lora)
    bounds = [0, 3, 7, weight.shape[0]]  # uneven shards, as FSDP gives the last rank
    shards = [merge_weight(weight[lo:hi], lora, rows=slice(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(shards), full, atol=1e-5, rtol=1e-6)  # BLAS blocking differs per shard
    with pytest.raises(MergeError, match="does not match"):
        merge_weight(weight[0:3], lora, rows=slice(0, 4))


def test_merge_is_computed_in_fp32_then_cast():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 16, generator=generator).bfloat16()
    lora = LoRAWeights(torch.randn(4, 16, generator=generator) * 1e-3, torch.randn(32, 4, generator=generator), 2.0)
    merged = merge_weight(weight, lora)
    assert merged.dtype == torch.bfloat16
    expected = (weight.float() + lora_delta(lora.lora_A, lora.lora_B, lora.scale)).bfloat16()
    assert torch.equal(merged, expected)
    assert merge_weight(weight, lora, out_dtype=torch.float32).dtype == torch.float32
    restored = unmerge_weight(merge_weight(weight, lora, out_dtype=torch.float32), lora, out_dtype=torch.bfloat16)
    assert torch.equal(restored, weight)


def test_merge_shape_mismatch_is_an_error():
    lora = LoRAWeights(torch.ones(2, 16), torch.ones(8, 2), 1.0)
    with pytest.raises(MergeError, match="different base model"):
        merge_weight(torch.zeros(16, 8), lora, name="q_proj.weight")
    with pytest.raises(MergeError, match="not"):
        lora_delta(torch.ones(2, 16), torch.ones(8, 3), 1.0)


def test_merge_state_dict_casts_and_checks_modules():
    generator = torch.Generator().manual_seed(3)
    state = {
        "q.weight": torch.randn(8, 16, generator=generator),
        "q.bias": torch.randn(8, generator=generator),
        "steps": torch.tensor([7]),
    }
    lora = LoRAWeights(torch.randn(2, 16, generator=generator), torch.randn(8, 2, generator=generator), 0.5)
    merged = merge_state_dict(state, {"q": lora}, out_dtype=torch.bfloat16)
    assert merged["q.weight"].dtype == merged["q.bias"].dtype == torch.bfloat16
    assert torch.equal(merged["steps"], state["steps"])
    expected = state["q.weight"] + 0.5 * lora.lora_B @ lora.lora_A
    torch.testing.assert_close(merge_state_dict(state, {"q": lora})["q.weight"], expected)
    assert merge_state_dict(state, {})["q.bias"] is state["q.bias"]
    with pytest.raises(MergeError, match="missing from the base"):
        merge_state_dict(state, {"k": lora})


def test_lora_scale():
    assert lora_scale(8, 16) == 2.0
    assert lora_scale(16, 8, use_rslora=True) == 2.0
    with pytest.raises(MergeError):
        lora_scale(0, 16)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_flat_slices_cutting_rows_and_blocks_merge_like_one_rank(monkeypatch, fan_in_fan_out):
    """ZeRO-3 partitions are flat element ranges that start and end inside rows and span several
    merge blocks; every split of the tensor must give the bytes one whole-tensor pass gives."""
    from lora_dist.export import sources

    monkeypatch.setattr(sources, "MERGE_BLOCK_ROWS", 4)
    generator = torch.Generator().manual_seed(3)
    rows, row_len, r = 37, 11, 3
    a = torch.randn(r, rows if fan_in_fan_out else row_len, generator=generator)
    b = torch.randn(row_len if fan_in_fan_out else rows, r, generator=generator)
    lora = LoRAWeights(a, b, 0.7, fan_in_fan_out)
    flat = torch.randn(rows * row_len, generator=generator)
    one = sources.merge_flat(flat, 0, flat.numel(), (rows, row_len), lora, torch.float32, "w")
    reference = merge_weight(flat.view(rows, row_len), lora)
    torch.testing.assert_close(one.view(rows, row_len), reference, atol=1e-6, rtol=0)
    for world in (2, 3, 5, 7):
        per_rank = -(-flat.numel() // world)  # ZeRO-3's partition size; the last one is short
        pieces = [sources.merge_flat(flat[s : s + per_rank], s, min(s + per_rank, flat.numel()), (rows, row_len),
                                     lora, torch.float32, "w") for s in range(0, flat.numel(), per_rank)]
        assert any(s % row_len for s in range(0, flat.numel(), per_rank)), "no partition starts inside a row"
        assert torch.equal(torch.cat(pieces), one), f"world size {world}"


# ----------------------------------------------------------------------------- stacked experts (target_parameters)


class _Experts(torch.nn.Module):
    """A fused expert stack: ``(E, out, in)``, or ``(E, in, out)`` when ``is_transposed`` (as transformers marks it)."""

    def __init__(self, transposed: bool, experts: int = 3, d_in: int = 6, d_out: int = 5) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (experts, d_in, d_out) if transposed else (experts, d_out, d_in)
        self.weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (E, tokens, in)
        w = self.weight if self.is_transposed else self.weight.transpose(1, 2)
        return torch.bmm(x, w)


@pytest.mark.parametrize("transposed", [False, True])
def test_stacked_delta_equals_peft_param_wrapper(transposed):
    """lora_delta/merge_weight of a stacked adapter equal PEFT's ParamWrapper delta, merge and forward."""
    from lora_dist.merge import LoRAWeights, lora_delta, lora_rows, merge_weight

    class Host(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = _Experts(transposed)

        def forward(self, x):
            return self.experts(x)

    model = peft.get_peft_model(Host(), peft.LoraConfig(r=2, lora_alpha=3, target_parameters=["experts.weight"]))
    wrapper = model.base_model.model.experts
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part in (wrapper.lora_A["default"], wrapper.lora_B["default"]):
            part.weight.copy_(torch.randn(part.weight.shape, generator=generator))
    a, b = wrapper.lora_A["default"].weight.detach(), wrapper.lora_B["default"].weight.detach()
    lora = LoRAWeights(a, b, 1.5, fan_in_fan_out=transposed, num_experts=3)
    w0 = wrapper.get_base_layer().weight.detach().clone()
    E, d1, d2 = w0.shape
    reference = wrapper.get_delta_weight("default").detach()
    torch.testing.assert_close(lora_delta(a, b, 1.5, transposed, num_experts=3).view(E, d1, d2), reference,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(lora_delta(a, b, 1.5, transposed, rows=slice(1, 3), num_experts=3).view(2, d1, d2),
                               reference[1:3], atol=1e-6, rtol=0)
    for e in range(E):  # one expert's rows, as a checkpoint storing experts one by one holds them
        torch.testing.assert_close(lora_delta(*_ab(lora_rows(lora, slice(1, 4), e)), 1.5, transposed),
                                   reference[e, 1:4], atol=1e-6, rtol=0)
    merged = merge_weight(w0.reshape(E, -1), lora).view(E, d1, d2)
    x = torch.randn(E, 4, d2 if not transposed else d1, generator=generator)
    with torch.no_grad():
        lora_out = model(x)
        model.merge_adapter()
    torch.testing.assert_close(merged, wrapper.get_base_layer().weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.bmm(x, merged if transposed else merged.transpose(1, 2)), lora_out,
                               atol=1e-5, rtol=0)


def _ab(lora):
    return lora.lora_A, lora.lora_B


def test_stacked_adapter_of_the_wrong_shape_is_refused():
    from lora_dist.merge import LoRAWeights, MergeError, merge_weight

    lora = LoRAWeights(torch.zeros(6, 4), torch.zeros(5, 6), 1.0, num_experts=3)
    with pytest.raises(MergeError, match=r"base shape \(3, 21\) does not match the adapter's \(3, 20\)"):
        merge_weight(torch.zeros(3, 21), lora)
    with pytest.raises(MergeError, match=r"not \(E\*r, in\) and \(out, r\*E\) for E=4 experts"):
        merge_weight(torch.zeros(4, 20), LoRAWeights(torch.zeros(6, 4), torch.zeros(5, 6), 1.0, num_experts=4))


def test_a_stack_is_checked_in_every_dim():
    """A stack stored transposed (Qwen3-VL-MoE's Hub layout, (E, in, out)) has the adapter's size but not its shape:
    refused, not added element by element into the wrong places."""
    from lora_dist.export.sources import merge_flat
    from lora_dist.merge import LoRAWeights, MergeError, merge_weight

    generator = torch.Generator().manual_seed(0)
    lora = LoRAWeights(torch.randn(6, 4, generator=generator), torch.randn(5, 6, generator=generator), 1.0,
                       num_experts=3)  # (3, out=5, in=4)
    w = torch.randn(3, 5, 4, generator=generator)
    torch.testing.assert_close(merge_weight(w, lora), merge_weight(w.reshape(3, 20), lora).view(3, 5, 4), atol=0,
                               rtol=0)
    with pytest.raises(MergeError, match=r"base shape \(3, 4, 5\) does not match the adapter's \(3, 5, 4\)"):
        merge_weight(w.reshape(3, 4, 5), lora)
    with pytest.raises(MergeError, match=r"base shape \(3, 4, 5\) does not match the adapter's \(3, 5, 4\)"):
        merge_flat(w.reshape(-1), 0, 60, (3, 4, 5), lora, torch.float32, "experts.gate_up_proj")
    transposed = dataclasses.replace(lora, fan_in_fan_out=True)  # the same adapter, stored (E, in, out)
    merged = merge_flat(w.reshape(-1), 0, 60, (3, 4, 5), transposed, torch.float32, "experts.gate_up_proj")
    torch.testing.assert_close(merged.view(3, 4, 5).transpose(1, 2),
                               merge_weight(w.reshape(3, 4, 5).transpose(1, 2).contiguous(), lora), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_piece_of_a_stack_merges_only_its_experts_a_block_at_a_time(monkeypatch, fan_in_fan_out):
    """A rank holding experts 2-3 of 16 (FSDP2 Shard(0)), or a ZeRO-3 partition cutting experts, computes only
    those experts' rows, at most MERGE_BLOCK_ROWS rows of one expert at a time, with the bits of one pass."""
    import lora_dist.merge as merge_mod
    from lora_dist.export import sources

    monkeypatch.setattr(sources, "MERGE_BLOCK_ROWS", 16)
    E, out_f, in_f, r = 16, 40, 24, 3
    generator = torch.Generator().manual_seed(5)
    lora = LoRAWeights(torch.randn(E * r, in_f, generator=generator), torch.randn(out_f, r * E, generator=generator),
                       0.5, fan_in_fan_out, E)
    shape = (E, in_f, out_f) if fan_in_fan_out else (E, out_f, in_f)
    w = torch.randn(shape, generator=generator)
    reference = merge_weight(w.reshape(E, -1), lora).reshape(-1)  # the whole stack at once
    one = sources.merge_flat(w.reshape(-1), 0, w.numel(), shape, lora, torch.float32, "experts")
    torch.testing.assert_close(one, reference, atol=1e-6, rtol=0)

    seen, blocks, real_merge, real_delta = [], [], sources.merge_weight, merge_mod.lora_delta

    def merge_spy(weight, *args, **kwargs):
        blocks.append(tuple(weight.shape))
        return real_merge(weight, *args, **kwargs)

    def delta_spy(*args, **kwargs):
        delta = real_delta(*args, **kwargs)
        seen.append(tuple(delta.shape))
        return delta

    monkeypatch.setattr(sources, "merge_weight", merge_spy)
    monkeypatch.setattr(merge_mod, "lora_delta", delta_spy)
    expert = w[0].numel()
    flat = w.reshape(-1)
    for start, end in ((2 * expert, 4 * expert), (5 * expert + 7 * shape[2] + 3, 7 * expert + 9)):
        seen.clear()
        blocks.clear()
        piece = sources.merge_flat(flat[start:end], start, end, shape, lora, torch.float32, "experts")
        assert torch.equal(piece, one[start:end])
        assert seen and max(math.prod(s) for s in seen + blocks) <= 16 * shape[2], seen + blocks  # a block of rows
        experts = -(-end // expert) - start // expert
        assert len(blocks) <= experts * -(-shape[1] // 16), blocks  # only the experts the piece touches


#: How a process turns on reduced-precision fp32 matmuls: torch's legacy APIs (what TrainingArguments(tf32=True)
#: calls) and its per-backend one.
_REDUCED_FP32 = {
    "matmul_precision_high": lambda: torch.set_float32_matmul_precision("high"),
    "matmul_precision_medium": lambda: torch.set_float32_matmul_precision("medium"),
    "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "cuda_fp32_precision": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "mkldnn_fp32_precision": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
}


def _precisions() -> tuple[str, str, str]:
    return (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


@pytest.mark.parametrize("setting", sorted(_REDUCED_FP32))
def test_the_delta_is_computed_in_full_fp32_whatever_the_process_set(monkeypatch, setting):
    """A GPU with TF32 on would compute B @ A in TF32: the merge forces IEEE fp32 around it, then restores."""
    saved = _precisions()
    try:
        _REDUCED_FP32[setting]()
        before = _precisions()
        assert "tf32" in before or "bf16" in before
        during, real = [], torch.Tensor.__matmul__

        def matmul(a, b):
            during.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
            return real(a, b)

        monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
        generator = torch.Generator().manual_seed(0)
        a, b = torch.randn(2, 6, generator=generator), torch.randn(5, 2, generator=generator)
        lora_delta(a, b, 2.0)
        merge_weight(torch.zeros(6, 5), LoRAWeights(a, b, 2.0, fan_in_fan_out=True))
        merge_weight(torch.zeros(3, 5, 6), LoRAWeights(a.repeat(3, 1), b.repeat(1, 3), 2.0, num_experts=3))
        monkeypatch.undo()
        assert during and set(during) == {("ieee", "ieee")}
        assert _precisions() == before  # the process's settings, as it set them
        if setting.startswith(("matmul_precision", "allow")):  # the legacy API still reads what it set
            assert torch.get_float32_matmul_precision() == setting.rpartition("_")[2].replace("tf32", "high")
    finally:  # torch's defaults again, for the tests that follow
        torch.set_float32_matmul_precision("highest")
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved[:2]
        torch.backends.mkldnn.matmul.fp32_precision = saved[2]
    assert torch.get_float32_matmul_precision() == "highest" and _precisions() == saved
