"""3 ranks: the loss over vocabulary shards (lora_dist.loss.linear_cross_entropy_sum with a group) == the plain loss.

Each rank holds ``torch.chunk`` rows of one head (53 rows over 3 ranks: 18, 18, 17, as FSDP2's
``Shard(0)`` cuts them) and its own tokens (a different count on every rank, some ignored),
and scales its loss by its own factor before backward. Each rank compares its loss and
its hidden states' gradient with the plain loss of the whole head's logits over its
own tokens (fp32), also where a rank holds no rows of the head. An NF4 head dequantized a few vocabulary rows at a time (blocks starting inside a scale
group) gives the loss and gradient of its rows dequantized whole, for bf16 hidden states. Prints a JSON line on rank 0 with the largest differences (the gradient's relative to its largest element).
"""

import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lora_dist.loss
from lora_dist.loss import IGNORE, linear_cross_entropy_sum, token_loss_sum
from lora_dist.nf4 import dequantize, quantize_whole

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
VOCAB, HIDDEN = 53, 16
g = torch.Generator().manual_seed(0)
weight = torch.randn(VOCAB, HIDDEN, generator=g)
bias = torch.randn(VOCAB, generator=g)
rows = torch.chunk(torch.arange(VOCAB), world)[rank]
start = int(rows[0])

worst = {"loss": 0.0, "grad": 0.0}
for case, (chunk, with_bias) in enumerate([(1, True), (4, False), (5, True), (1000, True)]):
    gr = torch.Generator().manual_seed(100 * case + rank)
    length = 5 + 4 * rank  # 5, 9, 13 tokens per sequence: the ranks pad to the longest
    hidden = torch.randn(2, length, HIDDEN, generator=gr, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, VOCAB, (2, length), generator=gr)
    labels[0, :2] = IGNORE
    b = bias if with_bias else None
    scale = 0.3 * (rank + 1)

    plain = token_loss_sum(F.linear(hidden, weight, b), labels)
    (grad_plain,) = torch.autograd.grad(plain * scale, hidden)
    sharded = linear_cross_entropy_sum(hidden, weight[rows], b[rows] if b is not None else None, labels, chunk,
                                       start, dist.group.WORLD)
    (grad_sharded,) = torch.autograd.grad(sharded * scale, hidden)
    torch.testing.assert_close(sharded, plain, rtol=1e-6, atol=1e-5)
    # fp32 sums in another order (three partial products): an error relative to the gradient's scale
    scale_of_grad = float(grad_plain.abs().max())
    torch.testing.assert_close(grad_sharded, grad_plain, rtol=1e-5, atol=2e-6 * scale_of_grad)
    worst["loss"] = max(worst["loss"], float((sharded - plain).detach().abs()))
    worst["grad"] = max(worst["grad"], float((grad_sharded - grad_plain).abs().max()) / scale_of_grad)

# a rank holding no vocabulary rows (rank 1 of 3): no logits, a log-sum-exp of -inf, a zero gradient to reduce-scatter
if world == 3:
    edges = [0, 30, 30, VOCAB]
    empty_start = edges[rank]
    empty_rows = torch.arange(edges[rank], edges[rank + 1])
    gr = torch.Generator().manual_seed(50 + rank)
    hidden = torch.randn(2, 7, HIDDEN, generator=gr, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, VOCAB, (2, 7), generator=gr)
    plain = token_loss_sum(F.linear(hidden, weight, bias), labels)
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    sharded = linear_cross_entropy_sum(hidden, weight[empty_rows], bias[empty_rows], labels, 4, empty_start,
                                       dist.group.WORLD)
    (grad_sharded,) = torch.autograd.grad(sharded, hidden)
    torch.testing.assert_close(sharded, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_sharded, grad_plain, rtol=1e-5, atol=2e-6 * float(grad_plain.abs().max()))
    worst["loss"] = max(worst["loss"], float((sharded - plain).detach().abs()))
    worst["grad"] = max(worst["grad"], float((grad_sharded - grad_plain).abs().max()) / float(grad_plain.abs().max()))

with torch.no_grad():  # evaluation: a forward alone, and a rank with one token (no target at all)
    hidden = torch.randn(1, 1 if rank == 1 else 6, HIDDEN)
    labels = torch.randint(0, VOCAB, hidden.shape[:2])
    plain = token_loss_sum(F.linear(hidden, weight, bias), labels)
    sharded = linear_cross_entropy_sum(hidden, weight[rows], bias[rows], labels, 3, start, dist.group.WORLD)
    torch.testing.assert_close(sharded, plain, rtol=1e-6, atol=1e-5)


def converted_blocks_equal_converted_rows(weight, stored_rows, start, block_rows):
    """The loss and gradient over this rank's NF4 ``stored_rows`` (``block_rows`` dequantized to bf16 at a time)
    equal those over the rows dequantized to bf16 whole, for bf16 hidden states."""
    gr = torch.Generator().manual_seed(7 + rank)
    hidden = torch.randn(2, 6 + 3 * rank, weight.shape[1], generator=gr).bfloat16().requires_grad_()
    labels = torch.randint(0, weight.shape[0], hidden.shape[:2], generator=gr)
    whole = dequantize(stored_rows, torch.bfloat16)
    expected = linear_cross_entropy_sum(hidden, whole, None, labels, 4, start, dist.group.WORLD)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    lora_dist.loss.HEAD_BLOCK_ROWS, kept = block_rows, lora_dist.loss.HEAD_BLOCK_ROWS
    try:
        got = linear_cross_entropy_sum(hidden, stored_rows, None, labels, 4, start, dist.group.WORLD)
        (grad,) = torch.autograd.grad(got, hidden)
    finally:
        lora_dist.loss.HEAD_BLOCK_ROWS = kept
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    # fp32 sums of the shards' and blocks' products in another order, against bf16 hidden states' gradient
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=0, atol=1e-2 * float(expected_grad.abs().max()))
    return float((grad.float() - expected_grad.float()).abs().max()) / float(expected_grad.abs().max())


big = torch.randn(768, 64, generator=torch.Generator().manual_seed(1)).bfloat16()  # 256 rows per rank: NF4 groups
nf4_rows = torch.chunk(torch.arange(768), world)[rank]
nf4_start = int(nf4_rows[0])
nf4_shard = quantize_whole(big[nf4_rows])  # each rank's rows quantized on their own (the rows are what counts here)
worst["converted"] = converted_blocks_equal_converted_rows(big, nf4_shard, nf4_start, 100)  # 100 + 100 + 56 rows

if rank == 0:
    print(json.dumps(worst))
dist.destroy_process_group()
