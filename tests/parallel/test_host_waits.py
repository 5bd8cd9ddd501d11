"""A training step makes the host wait for the device only once it has queued all of its work.

On a GPU, every operation whose result the host must read (``.item()``, ``bool(t)``, ``nonzero``, boolean
indexing) stops the host until the device has run everything queued before it; meanwhile no new kernel is
launched, so the device idles for the launch latency of what follows. A wait in the middle of a step (the loss
finding its rows, the optimizer learning the gradient norm before clipping) does that once per micro-batch or
step. What the loss needs from the labels is found on the host when the batch is built
(:meth:`lora_dist.data.PackedDataset.inputs`), and clipping multiplies by a coefficient on the device.

These operations are visible on the CPU too: a dispatch mode records them while a step runs. The step runs
on a fake process group of 2 ranks (the engines' collectives run, as they would on a cluster).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from lora_dist.config import ParallelConfig, TrainConfig
from lora_dist.data import PackedDataset
from lora_dist.loss import IGNORE
from lora_dist.lora import LoRAConfig, inject_lora
from lora_dist.session import make_engine
from lora_dist.train import forward_backward

aten = torch.ops.aten
#: operations whose result the host reads (each waits for the device)
READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
         aten._unique2, aten.unique_consecutive, aten.unique_dim}


class HostReads(TorchDispatchMode):
    """Records every operation, and which of them make the host read a result (of a tensor other than ``host``'s,
    which live in host memory on a GPU machine too)."""

    def __init__(self, host: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.host = {t.untyped_storage().data_ptr() for t in host}
        self.ops: list[str] = []
        self.reads: list[int] = []  # positions in ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].untyped_storage().data_ptr() in self.host:
            return func(*args, **kwargs)
        indices = args[1] if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) else ()
        boolean_index = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())
        if func.overloadpacket in READS or func is aten.repeat_interleave.Tensor or boolean_index:
            self.reads.append(len(self.ops))
        self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def fake_two_ranks():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _chat_batches(vocab: int, n: int = 2) -> list[dict]:
    """Micro-batches of packed documents whose prompts and padding carry no loss, built as a run builds them.

    Each holds a row of several documents (or a document and padding), as packed chat data does: where every row
    holds one document the batch has no mask, and then transformers itself (5.x, ``find_packed_sequence_indices``)
    reads ``position_ids`` to look for documents in every forward, a wait lora_dist cannot take away (a mask would
    cost sdpa its causal kernel)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # each row's first document's prompt
    labels[1, 9:12] = IGNORE  # a second document's prompt
    positions = torch.arange(16).repeat(4, 1)
    positions[1, 9:] = torch.arange(7)
    positions[3, 11:] = torch.arange(5)  # padding, which starts at 0 too
    lengths = torch.tensor([16, 16, 13, 11])
    data = PackedDataset(ids, labels, positions, lengths)
    return [data.inputs([2 * k, 2 * k + 1], torch.device("cpu")) for k in range(n)]


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp", "none"])
def test_a_step_reads_from_the_device_only_after_queuing_its_work(fake_two_ranks, tiny_model, strategy):
    torch.manual_seed(0)
    model = tiny_model("llama")
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # fsdp2's engine without fully_shard: the sharded AdamW (reduce-scatter, clip, update, all-gather); ddp's: the
    # bucketed all-reduce and clip_grad_norm_
    engine = make_engine(model, optimizer, ParallelConfig(strategy=strategy), TrainConfig(max_grad_norm=1e-3),
                         torch.device("cpu"))
    assert engine.use_chunked_loss(8) is None  # the chunked head loss, which picks the rows that carry a loss
    micro = _chat_batches(model.config.vocab_size)
    assert all((b["labels"] == IGNORE).any() and b["attention_mask"] is not None for b in micro)

    with HostReads() as seen:
        loss, tokens = forward_backward(engine, micro)  # its one read, .tolist() of a host tensor, dispatches nothing
    assert not seen.reads, [seen.ops[k] for k in seen.reads]
    # counted on the host (a fake group's all-reduce leaves this rank's count)
    assert tokens == sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro) and loss > 0

    engine.step(1e-3)
    # AdamW's step counts: on the host unless the optimizer is fused or capturable (read there, no wait)
    optimizers = [engine.optimizer, getattr(getattr(engine, "sharded", None), "optimizer", None)]
    counts = tuple(st["step"] for o in optimizers if o is not None for st in o.state.values())
    assert counts
    forward_backward(engine, micro)
    with HostReads(host=counts) as seen:
        norm = engine.step(1e-3)
    # the returned norm is the step's one read, after the update and the LoRA all-gather were queued
    assert seen.reads == [len(seen.ops) - 1], [(k, seen.ops[k]) for k in seen.reads]
    assert norm > 1e-3  # the coefficient on the device clipped (checked against one process in the suite's runs)


def test_the_sharded_embedding_lookup_waits_only_for_the_token_count(fake_two_ranks):
    """fsdp2's vocabulary-sharded embedding lookup, the first work of every forward, reads one number on the host:
    the largest rank's token count, which sizes the exchange (as the vocabulary-sharded head's loss reads its row
    count). This rank's rows are chosen on the device (tests/dist_scripts/sharded_embedding.py: the lookup equals
    the gathered one)."""
    from lora_dist.parallel.embedding import lookup

    shard = torch.randn(8, 4)  # rows 8-15 of a 16-row vocabulary
    with HostReads() as seen:
        out = lookup(torch.tensor([[1, 9, 15], [8, 0, 12]]), shard, 8, None)
    assert out.shape == (2, 3, 4)
    assert [seen.ops[k] for k in seen.reads] == ["aten._local_scalar_dense.default"]


def test_the_recorder_sees_what_makes_the_host_wait():
    """The check above can fail: each of these reads is recorded."""
    x = torch.arange(6.0)
    for read in (lambda: float(x.sum()), lambda: bool(x.any()), lambda: x.nonzero(), lambda: x[x > 2],
                 lambda: x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))):
        with HostReads() as seen:
            read()
        assert seen.reads, read
