"""3 ranks: the lookup on vocabulary shards (lora_dist.parallel.embedding.lookup) == the whole embedding's, bitwise.

Each rank holds ``torch.chunk`` rows of one embedding (53 rows over 3 ranks: 18, 18, 17, as FSDP2's
``Shard(0)`` cuts them) and looks up its own tokens (another count on every rank, one rank none at
all), in fp32, in bf16, cast to bf16 (FSDP2's mixed precision), with a shard of no rows, and from NF4 rows (768 x 64: 256 rows
per rank, whole NF4 groups). Prints ``ok`` and the cases on rank 0.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lora_dist.parallel.embedding import lookup
from lora_dist.nf4 import dequantize, embedding_rows, nf4_module

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
cases = []


def check(weight: torch.Tensor, shards: list[torch.Tensor], dtype, name: str) -> None:
    """``shards[rank]`` is this rank's rows of ``weight`` (the whole lookup's reference)."""
    start = sum(s.shape[0] for s in shards[:rank])
    for length in ((3, 7 + 5 * rank), (1, 0 if rank == 1 else 4)):  # another count per rank; rank 1 none at all
        gr = torch.Generator().manual_seed(10 * len(cases) + rank)
        ids = torch.randint(0, weight.shape[0], length, generator=gr)
        got = lookup(ids, shards[rank], start, dist.group.WORLD, dtype)
        want = F.embedding(ids, weight).to(dtype or weight.dtype)
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape, want.shape)
        assert torch.equal(got, want), (name, rank, (got - want).abs().max())
        cases.append(f"{name} {tuple(ids.shape)}")


weight = torch.randn(53, 16, generator=g)
shards = list(torch.chunk(weight, world))
check(weight, shards, None, "fp32")
check(weight.bfloat16(), [s.bfloat16() for s in shards], None, "bf16")
check(weight, shards, torch.bfloat16, "fp32 computed in bf16")
tiny = torch.randn(2, 16, generator=g)  # 2 rows over 3 ranks: 1, 1, 0 (FSDP2's cut leaves the last rank none)
check(tiny, [*torch.chunk(tiny, world), tiny[:0]][:world], None, "an empty shard")

nf4 = nf4_module()
big = torch.randn(768, 64, generator=g, dtype=torch.bfloat16)
quantized = [nf4.to_nf4(s.contiguous(), 64, 256) for s in torch.chunk(big, world)]
whole = torch.cat([dequantize(q) for q in quantized])
check(whole, quantized, None, "nf4")
assert torch.equal(embedding_rows(quantized[rank], torch.tensor([0, 5])), whole[[256 * rank, 256 * rank + 5]])

if rank == 0:
    print("ok", len(cases), "cases:", ", ".join(cases))
dist.destroy_process_group()
