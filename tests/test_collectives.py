"""lora_dist's one-tensor collectives call torch's current names, and the old ones on a torch without them."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lora_dist.collectives import all_gather_single, reduce_scatter_single


def test_the_current_names_where_torch_has_them_else_the_old_ones(monkeypatch):
    calls = []
    for name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, lambda out, inp, _name=name, **kwargs: calls.append((_name, out, inp, kwargs)))
    out, inp = torch.empty(4), torch.ones(2)

    all_gather_single(out, inp, group="g")
    reduce_scatter_single(out, inp, op=dist.ReduceOp.MAX, async_op=True)
    monkeypatch.delattr(dist, "all_gather_single")  # a torch from before the new names
    monkeypatch.delattr(dist, "reduce_scatter_single")
    all_gather_single(out, inp, async_op=True)
    reduce_scatter_single(out, inp, group="g")

    assert [(name, o is out, i is inp, kwargs) for name, o, i, kwargs in calls] == [
        ("all_gather_single", True, True, {"group": "g", "async_op": False}),
        ("reduce_scatter_single", True, True, {"op": dist.ReduceOp.MAX, "group": None, "async_op": True}),
        ("all_gather_into_tensor", True, True, {"group": None, "async_op": True}),
        ("reduce_scatter_tensor", True, True, {"op": dist.ReduceOp.SUM, "group": "g", "async_op": False}),
    ]
