"""The fsdp2 engine's LoRA gradient all-reduce: bucketed, launched from backward, gradients held once."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lora_dist.lora import LoRAConfig, inject_lora, lora_parameters
from lora_dist.parallel import LoRAGradReducer


@pytest.fixture
def world():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8))
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2", "4"]))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()  # B = 0 would make every A gradient zero
    return model


def _loss(model, seed):
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(seed))
    return model(x).square().sum()


def test_reduced_gradients_are_the_local_ones_held_once_as_views(world):
    reference, model = _model(), _model()
    for seed in (1, 2):
        _loss(reference, seed).backward()
    params = lora_parameters(model)
    reducer = LoRAGradReducer(params, bucket_mb=4 * 48 * 4 / 1e6)  # a few buckets of ~2 tensors
    assert len(reducer.buckets) >= 3
    with reducer.no_sync():
        _loss(model, 1).backward()  # accumulates locally, communicates nothing
    assert all(p.grad is not None for p in params) and reducer._works == []
    _loss(model, 2).backward()
    # Every bucket was launched from backward, and its gradients moved into the flat copy it sends.
    assert len(reducer._works) == len(reducer.buckets)
    assert all(p.grad is None for p in params)
    reducer.finish()
    for p, q in zip(params, lora_parameters(reference)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    storages = {p.grad.untyped_storage().data_ptr() for p in params}
    assert len(storages) == len(reducer.buckets)  # one flat storage per bucket, no second copy
    assert reducer._works == []  # ready for the next step


def test_a_parameter_without_a_gradient_gets_the_reduced_zeros(world):
    model = _model()
    params = lora_parameters(model)
    reducer = LoRAGradReducer(params, bucket_mb=25)
    model[4].lora_B.weight.requires_grad_(False)  # as if the layer were skipped this step
    _loss(model, 1).backward()
    model[4].lora_B.weight.requires_grad_(True)
    assert model[4].lora_B.weight.grad is None
    reducer.finish()  # launches the bucket backward could not complete
    assert torch.equal(model[4].lora_B.weight.grad, torch.zeros_like(model[4].lora_B.weight))
    assert all(p.grad is not None for p in params)


def test_a_second_synced_backward_before_the_step_is_refused_not_lost(world):
    """A loop ported from DDP without ``engine.no_sync()`` on its first micro-batches: each bucket is sent once per
    step, so the second backward's gradients were never sent (and, under the sharded AdamW, leaked into the next
    step). Refused in one line naming the fix; after the step the next backward syncs as before."""
    from lora_dist.errors import UserError
    from lora_dist.parallel.reducer import GradientSyncError

    model = _model()
    reducer = LoRAGradReducer(lora_parameters(model), bucket_mb=25)
    _loss(model, 1).backward()
    with pytest.raises(GradientSyncError, match=r"run every micro-batch but the last inside engine.no_sync\(\)") as e:
        _loss(model, 2).backward()
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    reducer.finish()
    _loss(model, 3).backward()  # the next step
    reducer.finish()
    assert all(p.grad is not None for p in lora_parameters(model))
