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
