"""Every collective lora_dist issues gets tensors on the run's device.

A process group created for NCCL has no backend for CPU tensors, so a CPU tensor in a
collective stops a multi-GPU run at step 1, while world-size-1 runs and gloo never show it.
To make that failure visible on a CPU machine, the step runs with a non-default device
mapping: tensors created without an explicit device land on the meta device, while the
run's device is the CPU. Every collective is recorded (a fake process group of 2 ranks)
and must see only tensors on the run's device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lora_dist.config import ParallelConfig, TrainConfig
from lora_dist.lora import LoRAConfig, inject_lora
from lora_dist.parallel import check_replicas
from lora_dist.preemption import PreemptionHandler
from lora_dist.session import make_engine
from lora_dist.train import all_sum, forward_backward

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_single", "reduce_scatter_single",
               "all_gather_into_tensor", "reduce_scatter_tensor", "gather", "reduce")


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 16, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, **unused):
        return SimpleNamespace(logits=self.head(torch.tanh(self.proj(self.embed(input_ids)))))


@pytest.fixture
def recorded(monkeypatch):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    seen: list[tuple[str, torch.device, int]] = []
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:  # a torch without this name
            continue

        def wrapper(*args, _name=name, _real=real, **kwargs):
            given = [*args, *kwargs.values()]
            tensors = [a for a in given if isinstance(a, torch.Tensor)]
            tensors += [t for a in given if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            seen.extend((_name, t.device, t.numel()) for t in tensors)
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, wrapper)
    yield seen
    dist.destroy_process_group()


#: strategy -> (the engine's ParallelConfig, collectives its step must issue)
ENGINES = {
    "fsdp2_sharded_optimizer": (ParallelConfig(strategy="fsdp2"), {"reduce_scatter_single", "all_gather_single"}),
    "fsdp2_reducer": (ParallelConfig(strategy="fsdp2", shard_optimizer=False), {"all_reduce"}),
    "none": (ParallelConfig(strategy="none"), set()),
}


@pytest.mark.parametrize("strategy", list(ENGINES))
def test_every_collective_of_a_step_is_on_the_runs_device(recorded, strategy):
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = TinyLM()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # fsdp2's engine without fully_shard: its LoRA gradient reduction (the sharded AdamW's reduce-scatter and
    # all-gather by default, the bucketed all-reduce without it) is what communicates.
    cfg, issued = ENGINES[strategy]
    engine = make_engine(model, optimizer, cfg, TrainConfig(), device)
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6).expand(2, 6)
    micro = [{"input_ids": x, "labels": x.clone(), "position_ids": positions, "attention_mask": None}
             for x in (ids, ids.flip(1))]
    with torch.device("meta"), PreemptionHandler() as signals:  # what is created without a device lands on meta
        forward_backward(engine, micro)
        engine.step(1e-3)
        signals.poll(device)
        check_replicas(engine)
        all_sum(torch.ones(2, device=device))
    assert recorded, "the step issued no collective: the check would prove nothing"
    wrong = sorted({(name, str(d)) for name, d, _ in recorded if d != device})
    assert not wrong, f"collectives got tensors off the run's device: {wrong}"
    names = {name for name, _, _ in recorded}
    assert {"all_reduce", "broadcast"} | issued <= names, names
    assert not names & {"all_gather_into_tensor", "reduce_scatter_tensor"}, names  # deprecated: a FutureWarning in torch 2.13, 2.14
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if strategy == "fsdp2_reducer":  # the bucketed all-reduce of every LoRA gradient (one bucket here)
        assert ("all_reduce", device, lora) in recorded
