"""The inter-node byte counters' parsing (the measurement itself runs on the local cluster:
tests/cluster/test_cluster_hybrid.py)."""

from __future__ import annotations

import pytest

from lora_dist.bench.internode import interface_bytes, table

PROC_NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:   95512     950    0    0    0     0          0         0    95512     950    0    0    0     0       0          0
ld-veth1p:12345678901   1200    0    0    0     0          0         0  987654   1100    0    0    0     0       0          0
"""


def test_interface_bytes_reads_received_and_transmitted(tmp_path):
    dev = tmp_path / "dev"
    dev.write_text(PROC_NET_DEV)
    assert interface_bytes("ld-veth1p", str(dev)) == (12345678901, 987654)  # no space after a long name's colon
    assert interface_bytes("lo", str(dev)) == (95512, 95512)
    with pytest.raises(KeyError, match="'eth9' is not in"):
        interface_bytes("eth9", str(dev))


def test_table_relates_each_configuration_to_the_anchor_and_full_fsdp2():
    rows = [("lora_dist_hybrid", 1e6), ("lora_dist_fsdp2", 40e6), ("peft_accelerate_fsdp2", 50e6)]
    result = {"results": [{"config": c, "internode_bytes_per_step": b, "seconds_per_step": 1.0} for c, b in rows]}
    text = table(result)
    assert "| lora_dist_hybrid | 1.000 MB | 0.0200x | 0.0250x |" in text
    assert "| peft_accelerate_fsdp2 | 50.000 MB | 1.0000x | 1.2500x |" in text
    assert text.splitlines()[2].endswith("| 1.00 | - |")  # no tensors counted (a GPU run)


def test_table_shows_the_measured_tensors_and_the_planners_error():
    rows = [{"config": "lora_dist_hybrid", "internode_bytes_per_step": 1e6, "seconds_per_step": 1.0,
             "tensor_peak": 0.5e9, "planned_peak": 0.45e9},
            {"config": "peft_accelerate_fsdp2", "internode_bytes_per_step": 50e6, "seconds_per_step": 2.0,
             "tensor_peak": 0.6e9}]
    lines = table({"results": rows}).splitlines()
    assert lines[2].endswith("| 0.500 GB, 0.450 GB (-10.0%) |"), lines[2]
    assert lines[3].endswith("| 0.600 GB |"), lines[3]


def test_group_counter_counts_the_payload_of_positional_and_keyword_calls():
    """FSDP2 calls ``reduce_scatter_single(output=..., input=...)`` with keywords: its bytes count as a positional
    call's do, each by collective, in the group's entry (a fake world of 4 ranks, 2 per node)."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lora_dist.bench.internode import GroupCounter

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        node = dist.new_group([0, 1])
        with GroupCounter(local_world_size=2) as counter:
            dist.all_gather_single(torch.empty(8), torch.ones(2))  # the world: spans both nodes
            dist.reduce_scatter_single(output=torch.empty(1), input=torch.ones(2), group=node)
            dist.all_reduce(tensor=torch.ones(3), group=node)
        groups = {tuple(g["ranks"]): g for g in counter.as_list(steps=2)}
    finally:
        dist.destroy_process_group()
    world, local = groups[(0, 1, 2, 3)], groups[(0, 1)]
    assert world["spans_nodes"] and not local["spans_nodes"]
    assert world["call_payload_bytes_per_step"] == {"all_gather_single": 8 * 4 / 2}
    assert local["call_payload_bytes_per_step"] == {"reduce_scatter_single": 2 * 4 / 2, "all_reduce": 3 * 4 / 2}
    assert local["payload_bytes_per_step"] == (2 + 3) * 4 / 2
