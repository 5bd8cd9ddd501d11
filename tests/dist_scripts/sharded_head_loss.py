"""3 ranks: the loss over vocabulary shards (lora_dist.loss.linear_cross_entropy_sum with a group) == the plain loss.

Each rank holds ``torch.chunk`` rows of one head (53 rows over 3 ranks: 18, 18, 17, as FSDP2's
``Shard(0)`` cuts them) and its own tokens (a different count on every rank, some ignored),
and scales its loss by its own factor before backward. Each rank compares its loss and
its hidden states' gradient with the plain loss of the whole head's logits over its
own tokens (fp32). Prints a JSON line on rank 0 with the largest differences (the gradient's relative to its largest element).
"""

import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lora_dist.loss import IGNORE, linear_cross_entropy_sum, token_loss_sum

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

with torch.no_grad():  # evaluation: a forward alone, and a rank with one token (no target at all)
    hidden = torch.randn(1, 1 if rank == 1 else 6, HIDDEN)
    labels = torch.randint(0, VOCAB, hidden.shape[:2])
    plain = token_loss_sum(F.linear(hidden, weight, bias), labels)
    sharded = linear_cross_entropy_sum(hidden, weight[rows], bias[rows], labels, 3, start, dist.group.WORLD)
    torch.testing.assert_close(sharded, plain, rtol=1e-6, atol=1e-5)

if rank == 0:
    print(json.dumps(worst))
dist.destroy_process_group()
