"""The chunked head loss equals the plain loss of the full logits, value and gradients (fp32).

Checked on the function alone (bias, ignored labels, every chunk size) and on real tiny
models of several families (tied head, MoE) with LoRA: the same loss and the same LoRA
gradients as ``token_loss_sum`` of the model's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distutil import adapter_atol, assert_same_run, lora_dist, randomize_lora_B, ranks, short_run_args
from lora_dist.loss import IGNORE, ChunkedHeadLoss, chunkable, linear_cross_entropy_sum
from lora_dist.loss import token_loss_sum as _plain_sum


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_function_equals_the_plain_loss_and_its_gradient(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(50, 16, generator=g)
    bias = torch.randn(50, generator=g) if with_bias else None
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :4] = IGNORE
    labels[2, 5] = IGNORE

    plain = _plain_sum(F.linear(hidden, weight, bias), labels)
    (grad_plain,) = torch.autograd.grad(plain * 0.37, hidden)
    chunked = linear_cross_entropy_sum(hidden, weight, bias, labels, chunk)
    (grad_chunked,) = torch.autograd.grad(chunked * 0.37, hidden)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    # fp32 sums in another order (the softmax from the log-sum-exp): an error relative to the gradient's scale
    torch.testing.assert_close(grad_chunked, grad_plain, rtol=1e-5, atol=2e-6 * float(grad_plain.abs().max()))


def test_two_head_matmuls_per_chunk_and_none_without_grad():
    """One process: each chunk's gradient is computed from the logits forward already has (the head multiplies twice
    per chunk, as for the plain loss; recomputing the logits in backward made it three); without grad, once."""
    class HeadMatmuls(TorchDispatchMode):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.count = weight, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
                self.count += any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr()
                                  == self.weight.untyped_storage().data_ptr() for a in args)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 10, 16, generator=g, requires_grad=True)
    weight, labels = torch.randn(50, 16, generator=g), torch.randint(0, 50, (2, 10), generator=g)
    with HeadMatmuls(weight) as counted:
        linear_cross_entropy_sum(hidden, weight, None, labels, 5).backward()
    assert counted.count == 2 * 4  # 20 tokens in chunks of 5
    with torch.no_grad(), HeadMatmuls(weight) as counted:
        value = linear_cross_entropy_sum(hidden, weight, None, labels, 5)
    assert counted.count == 4
    torch.testing.assert_close(value, _plain_sum(F.linear(hidden, weight), labels), rtol=1e-6, atol=1e-5)


def test_only_tokens_with_a_loss_go_through_the_head():
    """Prompt tokens and padding (label -100) carry no loss: the head never multiplies them, and the value and
    gradient stay the plain loss's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HeadRows(TorchDispatchMode):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.rows = weight, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                a, b = args[-2], args[-1]
                if b.untyped_storage().data_ptr() == self.weight.untyped_storage().data_ptr():
                    self.rows.append(a.shape[0])
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 10, 16, generator=g, requires_grad=True)
    weight, labels = torch.randn(50, 16, generator=g), torch.randint(0, 50, (2, 10), generator=g)
    labels[0, :6] = IGNORE  # a prompt
    labels[1, 7:] = IGNORE  # padding
    with HeadRows(weight) as seen:
        loss = linear_cross_entropy_sum(hidden, weight, None, labels, 1000)
        (grad,) = torch.autograd.grad(loss, hidden)
    targets = int((labels[:, 1:] != IGNORE).sum())  # 13 of the 20 positions
    assert seen.rows == [targets, targets]  # the logits, and the gradient of the hidden states
    plain = _plain_sum(F.linear(hidden, weight), labels)
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, hidden)[0], rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_gradient():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    labels = torch.full((2, 4), IGNORE)
    loss = linear_cross_entropy_sum(hidden, torch.randn(11, 8), None, labels, 3)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def _lora_model(tiny_model, arch):
    from lora_dist import LoRAConfig, inject_lora

    model = tiny_model(arch)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora_B(model, 1, 0.1)
    return model.train()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral"])
def test_models_chunked_loss_and_lora_grads_equal_the_plain_ones(tiny_model, arch):
    model = _lora_model(tiny_model, arch)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE

    assert chunkable(model) is None
    torch.manual_seed(3)  # the same dropout masks (GPT-2) in both forwards
    plain = _plain_sum(model(input_ids=ids).logits, labels)
    plain.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    chunked = ChunkedHeadLoss(model, chunk=7)
    torch.manual_seed(3)
    with chunked.installed():
        out = model(input_ids=ids).logits
    assert out.shape[-1] == model.config.get_text_config().hidden_size  # the head returned its input
    loss = chunked.loss_sum(out, labels)
    loss.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-5)
    for name, grad in reference.items():
        # fp32 sums in another order: an error relative to the tensor's scale, not to each element
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5,
                                   atol=1e-5 * float(grad.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size  # outside the context: logits


def test_where_it_does_not_apply(tiny_model):
    from lora_dist import LoRAConfig, inject_lora

    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0
    assert "soft-caps" in chunkable(model)
    with pytest.raises(ValueError, match="soft-caps"):
        ChunkedHeadLoss(model, 8)
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, target_modules=["lm_head"]))
    assert chunkable(model) == "LoRA adapts the output head"


def test_loss_sum_needs_a_forward(tiny_model):
    chunked = ChunkedHeadLoss(tiny_model("llama"), 8)
    with pytest.raises(RuntimeError, match="before a forward"):
        chunked.loss_sum(torch.zeros(1, 2, 32), torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.dist
def test_loss_over_vocabulary_shards_equals_the_plain_loss_on_three_ranks():
    """Each of 3 ranks holds a third of the head's rows (uneven) and its own tokens (another count per rank,
    some ignored) and scales its loss by its own factor: its loss and its hidden states' gradient equal the
    plain loss of the whole head over its tokens, for 1-token, small and whole-batch chunks, with and
    without bias, a rank holding no rows of the head, and a no-grad forward where a rank has no target. An NF4 head dequantized a few vocabulary rows
    at a time: the loss and gradient of its rows dequantized whole (the gradient within bf16 roundings of the blocks'
    products)."""
    out = ranks(3, "tests/dist_scripts/sharded_head_loss.py")
    worst = json.loads(out.stdout.strip().splitlines()[-1])
    assert worst["loss"] < 1e-4 and worst["grad"] < 2e-6, worst  # relative to the largest gradient element
    assert worst["converted"] < 1e-2, worst


@pytest.mark.dist
def test_embedding_lookup_on_vocabulary_shards_equals_the_whole_lookup_on_three_ranks():
    """Each of 3 ranks holds a third of the embedding's rows (uneven) and looks up its own tokens (another count
    per rank, none on one): bit for bit the whole embedding's lookup, in fp32, bf16, cast to bf16, with a rank
    holding no rows, and from NF4 rows (lora_dist.parallel.embedding.lookup)."""
    out = ranks(3, "tests/dist_scripts/sharded_embedding.py")
    assert out.stdout.strip().splitlines()[-1].startswith("ok 10 cases"), out.stdout[-2000:]



@pytest.mark.dist
def test_a_head_with_a_bias_trains_under_zero3_to_the_one_process_result(tmp_path):
    """Phi's head has a bias: ZeRO-3 partitions it too, so the chunked loss gathers it with the weight (before,
    every step failed on the bias's empty partition)."""
    import transformers

    from lora_dist.demo import make_tokenizer, write_demo_data

    tok = make_tokenizer()
    config = transformers.PhiConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.PhiForCausalLM(config)
    assert model.lm_head.bias is not None
    model.save_pretrained(tmp_path / "phi")
    tok.save_pretrained(tmp_path / "phi")
    data = write_demo_data(tmp_path / "d.jsonl", n=200)
    common = ["train", *short_run_args(tmp_path / "phi", data, 3, 5e-3, "all-linear")]
    lora_dist(*common, f"output.dir={tmp_path / 'one'}", "parallel.strategy=none", "train.micro_batch_size=4")
    ranks(2, "-m", "lora_dist.cli", *common, f"output.dir={tmp_path / 'zero3'}", "parallel.strategy=zero3",
          "train.micro_batch_size=2")
    assert_same_run(tmp_path / "zero3", tmp_path / "one", adapter_atol(5e-3, 3))


def test_a_bf16_gradient_is_scaled_by_the_exact_step_scale():
    """The step divides the loss by its token count (here 300): its bf16 gradient is the scale-1 gradient times
    1/300 rounded once, not times a bf16-rounded 1/300 (0.21% off, for every element of a step's gradient)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 301, 64, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(97, 64, generator=g).bfloat16()
    labels = torch.randint(0, 97, (1, 301), generator=g)
    (unit,) = torch.autograd.grad(linear_cross_entropy_sum(hidden, weight, None, labels, 64), hidden)
    scale = torch.tensor(1 / 300)
    (scaled,) = torch.autograd.grad(linear_cross_entropy_sum(hidden, weight, None, labels, 64) * scale, hidden)
    expected = (unit.float() * scale).bfloat16()
    ratio = scaled.float().norm() / expected.float().norm()
    assert abs(float(ratio) - 1) < 2e-4, float(ratio)


class _LargestOutput(TorchDispatchMode):
    """The largest plain tensor of ``dtype`` any op makes within it."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.largest = dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor and t.dtype == self.dtype:
                self.largest = max(self.largest, t.numel())
        return out


def test_an_nf4_head_is_dequantized_a_block_of_vocabulary_rows_at_a_time():
    """An NF4 head (model.quantize_embeddings): the loss and its gradient are those of the head dequantized whole,
    and no bf16 tensor as large as the dequantized head ever exists: the loss holds one block of HEAD_BLOCK_ROWS
    vocabulary rows (5120 rows: blocks of 2048, 2048, 1024)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from lora_dist.loss import HEAD_BLOCK_ROWS
    from lora_dist.nf4 import dequantize

    vocab, width = 5120, 64
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, width, generator=g) / width ** 0.5
    head = to_nf4(weight.bfloat16())
    converted = dequantize(head, torch.bfloat16)
    hidden = torch.randn(2, 15, width, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (2, 15), generator=g)
    labels[1, :3] = IGNORE

    expected = linear_cross_entropy_sum(hidden, converted, None, labels, 8)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    with _LargestOutput(torch.bfloat16) as seen:
        got = linear_cross_entropy_sum(hidden, head, None, labels, 8)
        (grad,) = torch.autograd.grad(got, hidden)
    assert HEAD_BLOCK_ROWS < vocab and seen.largest == HEAD_BLOCK_ROWS * width, seen.largest
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)  # the same bf16 logits, in fp32
    # the three blocks' bf16 products summed in fp32, against one bf16 product: within a bf16 rounding
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=0, atol=8e-3 * float(expected_grad.abs().max()))


def test_a_sharded_nf4_head_is_decoded_twice_per_chunk_with_block_wide_fp32_logits(monkeypatch):
    """The head left sharded (a one-rank group here): each block of an NF4 head's rows is dequantized once for a
    chunk's forward and once for its gradient, which multiplies the block's softmax with the block it decoded
    (backward computing the whole chunk's logits first decoded every block twice), and no fp32 tensor is wider
    than one block: the forward keeps each token's log-sum-exp over the blocks online. The loss and gradient are
    those of the rows dequantized whole."""
    import torch.distributed as dist
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    import lora_dist.loss
    from lora_dist.loss import HEAD_BLOCK_ROWS
    from lora_dist.nf4 import dequantize

    vocab, width, chunk, tokens = 5120, 64, 8, 29  # blocks of 2048, 2048, 1024 rows; 4 chunks of 27 tokens
    g = torch.Generator().manual_seed(0)
    head = to_nf4((torch.randn(vocab, width, generator=g) / width ** 0.5).bfloat16())
    converted = dequantize(head, torch.bfloat16)
    hidden = torch.randn(1, tokens + 1, width, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=g)
    labels[0, 7] = labels[0, 20] = IGNORE  # 27 of the 29 positions with a next token carry a loss

    decoded = []
    dequantize_rows = lora_dist.loss.dequantize_rows
    monkeypatch.setattr(lora_dist.loss, "dequantize_rows",
                        lambda w, start, end, dtype: decoded.append(start) or dequantize_rows(w, start, end, dtype))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        expected = linear_cross_entropy_sum(hidden, converted, None, labels, chunk, 0, dist.group.WORLD)
        (expected_grad,) = torch.autograd.grad(expected, hidden)
        with _LargestOutput(torch.float32) as seen:
            got = linear_cross_entropy_sum(hidden, head, None, labels, chunk, 0, dist.group.WORLD)
            forward_decodes = len(decoded)
            (grad,) = torch.autograd.grad(got, hidden)
    finally:
        dist.destroy_process_group()
    chunks, blocks = -(-(tokens - 2) // chunk), -(-vocab // HEAD_BLOCK_ROWS)
    assert (forward_decodes, len(decoded)) == (chunks * blocks, 2 * chunks * blocks), (forward_decodes, len(decoded))
    assert seen.largest == chunk * HEAD_BLOCK_ROWS, seen.largest  # not chunk x vocab
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)  # the log-sum-exp over blocks, in fp32
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=0, atol=8e-3 * float(expected_grad.abs().max()))
