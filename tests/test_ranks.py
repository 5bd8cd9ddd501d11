"""lora_dist.ranks: the small collectives of file work, on real ranks."""

from __future__ import annotations

import json
import textwrap

import pytest

from distutil import ranks

GATHER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    import lora_dist.ranks as ranks_mod
    from lora_dist.ranks import RankGroup

    dist.init_process_group("gloo")
    group = RankGroup()
    payload = ((torch.arange(10_000) * (group.rank + 3)) % 251).to(torch.uint8)
    rounds = []  # the bytes rank 0 receives in each gather
    real_gather = dist.gather

    def gather(tensor, gather_list=None, *args, **kwargs):
        rounds.append(tensor.numel() * tensor.element_size() * group.world)
        return real_gather(tensor, gather_list, *args, **kwargs)

    dist.gather = gather
    results = {}
    for budget in (1 << 30, 4096, 3):  # one round; rounds of 2048 bytes per rank; of 1 byte
        ranks_mod.GATHER_BUDGET = budget
        rounds.clear()
        got = group.gather_bytes(payload)
        fits = max(rounds) <= max(budget, group.world) and sum(rounds) == 10_000 * group.world
        if group.rank == 0:
            want = [((torch.arange(10_000) * (r + 3)) % 251).to(torch.uint8) for r in range(group.world)]
            results[budget] = fits and len(got) == group.world and all(
                g.device.type == "cpu" and torch.equal(g, w) for g, w in zip(got, want))
        else:
            results[budget] = fits and got is None
    with open(f"{sys.argv[1]}.{group.rank}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
""")


@pytest.mark.dist
def test_gather_bytes_in_rounds_equals_one_gather(tmp_path):
    """Rank 0 receives at most GATHER_BUDGET bytes per round (a whole tensor would not fit on its GPU beside
    the model's shards); what it assembles in host memory is every rank's payload, whatever the rounds."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    ranks(2, str(script), str(tmp_path / "out"))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out.{rank}").read_text()) == {str(b): True for b in (1 << 30, 4096, 3)}


STOPPED = textwrap.dedent("""
    import json, sys, time
    from lora_dist.launch import init_distributed
    import lora_dist.preemption as preemption
    from lora_dist.preemption import Preempted
    from lora_dist.ranks import RankGroup

    init_distributed(60, backend="gloo")
    results = {}

    def stopped_after_a_while():
        time.sleep(0.5)
        raise Preempted(0, before_training=True)

    for name, group in (("default", RankGroup()), ("patient", RankGroup(patient=True))):
        assert (group.group is not None) == (name == "patient")
        for case, call in (
            ("on_rank0", lambda: group.on_rank0(stopped_after_a_while)),
            ("check", lambda: group.check(Preempted(0, before_training=True) if group.rank == 1 else None)),
        ):
            preemption._stopping = False  # each case logs its stop
            try:
                call()
                results[f"{name} {case}"] = "returned"
            except Preempted as e:
                results[f"{name} {case}"] = [e.code, e.before_training]
            # the ranks are still in step: a plain call after each stop agrees
            results[f"{name} {case} after"] = group.on_rank0(lambda: group.rank + 7)
    with open(f"{sys.argv[1]}.{group.rank}", "w") as f:
        json.dump(results, f)
""")


@pytest.mark.dist
def test_a_rank_stopped_before_training_stops_the_others(tmp_path):
    """A stop signal before training raises Preempted in the rank that got it. Where that rank was rank 0 inside
    on_rank0, or a rank inside the work a check() waits for, the others were left in a collective it never joined
    (a hang, or an error exit that no sbatch script requeues). On the default group and on the patient one (where
    the waiting ranks poll), every rank now raises Preempted, and the group stays usable."""
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED)
    proc = ranks(2, str(script), str(tmp_path / "out"), timeout=120)
    want = {f"{name} {case}": [99, True] for name in ("default", "patient") for case in ("on_rank0", "check")}
    want.update({f"{key} after": 7 for key in list(want)})
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out.{rank}").read_text()) == want
    assert "rank 0 was stopped before training" in proc.stderr and "rank 1 was stopped before training" in proc.stderr
