"""The benchmark's lora_dist configurations describe what they ran."""

from __future__ import annotations

import torch

from lora_dist.bench.systems import BenchSettings, LoraDist


def test_auto_is_chosen_once_so_the_note_and_the_plan_describe_the_run(tiny_checkpoint, tmp_path, monkeypatch):
    """On a GPU the budget is the free memory of the moment, smaller once the model is loaded. The choice made
    before the build names the strategy in the note and in plan() (chosen again after it, the planner found
    nothing fitting any more, and the configuration failed after it had been built)."""
    import lora_dist.plan as plan
    from lora_dist.demo import write_demo_data

    real, calls = plan.memory_budget, []

    def shrinking(memory_gb, device, local_ranks):
        calls.append(local_ranks)
        return real(memory_gb, device, local_ranks) if len(calls) == 1 else 1  # then 1 byte: nothing fits

    monkeypatch.setattr(plan, "memory_budget", shrinking)
    data = write_demo_data(tmp_path / "data.jsonl")
    settings = BenchSettings(model_path=str(tiny_checkpoint("llama")), data_path=str(data), seq_len=16, lora_r=2,
                             lora_alpha=4.0)
    system = LoraDist(settings, torch.device("cpu"), "auto")
    system.setup()
    planned = system.plan()
    assert len(calls) == 1
    ran = system.cfg.parallel.strategy
    assert ran != "auto" and system.notes == [f"auto chose {plan.mode_name(system.cfg.parallel)}"]
    assert planned == plan.plan_memory(system.cfg, 1).as_dict() and planned["total"] > 0
