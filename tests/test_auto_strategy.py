"""``parallel.strategy=auto``: the planner picks the fastest strategy whose predicted peak fits the memory per rank.

The choice is checked against the planner's own predictions of each candidate (which ``tests/test_plan.py``
checks against measured memory), and a 2-rank ``auto`` run must train the adapter the strategy it chose trains.
"""

from __future__ import annotations

import dataclasses
import json

from pathlib import Path

import pytest

from distutil import assert_same_adapter, llama_config_dir, ranks
from lora_dist.config import ConfigError, config_from_dict, config_to_dict, load_config
from lora_dist.plan import GB, choose_strategy, memory_budget, plan_memory

WORLD = 4


@pytest.fixture(scope="module")
def deep_config(tmp_path_factory) -> Path:
    """A Llama config.json with enough blocks that FSDP2's gathered blocks are a small part of the base."""
    return llama_config_dir(tmp_path_factory.mktemp("deep"), vocab=512, hidden=128, intermediate=256, layers=12)


def _cfg(path: Path, *extra: str):
    return load_config(None, [f"model.path={path}", "parallel.strategy=auto", "lora.r=4",
                              "train.micro_batch_size=4", "train.seq_len=512", *extra])


def _peak(path: Path, strategy: str, *extra: str) -> int:
    return plan_memory(load_config(None, [f"model.path={path}", f"parallel.strategy={strategy}", "lora.r=4",
                                          "train.micro_batch_size=4", "train.seq_len=512", *extra]), WORLD).total


def test_generous_memory_picks_ddp_without_selective_recompute(deep_config):
    parallel, choice = choose_strategy(_cfg(deep_config), WORLD, 1000 * GB)
    assert (parallel.strategy, parallel.activation_checkpointing, parallel.selective_recompute) == ("ddp", False, False)
    assert choice.peaks == [("ddp without selective recompute",
                             _peak(deep_config, "ddp", "parallel.selective_recompute=false"))]


def test_a_bf16_cast_of_an_fp32_base_is_never_given_to_ddp(deep_config):
    """ddp computes in the base's dtype: auto chose it for parallel.mixed_precision=bfloat16 over an fp32 base,
    calling it the fastest, and the run computed in fp32. fsdp2 casts; over a bf16 base ddp stays first."""
    parallel, choice = choose_strategy(_cfg(deep_config, "parallel.mixed_precision=bfloat16"), WORLD, 1000 * GB)
    assert parallel.strategy == "fsdp2" and parallel.mixed_precision == "bfloat16"
    assert not any(name.startswith("ddp") for name, _ in choice.peaks)
    parallel, _ = choose_strategy(_cfg(deep_config, "parallel.mixed_precision=bfloat16", "model.dtype=bfloat16"),
                                  WORLD, 1000 * GB)
    assert parallel.strategy == "ddp"


def test_ddp_keeps_selective_recompute_where_only_that_fits(deep_config):
    ddp, kept = _peak(deep_config, "ddp"), _peak(deep_config, "ddp", "parallel.selective_recompute=false")
    assert ddp < kept  # selective recompute saves memory on this model
    parallel, choice = choose_strategy(_cfg(deep_config), WORLD, kept - 1)
    assert (parallel.strategy, parallel.activation_checkpointing, parallel.selective_recompute) == ("ddp", False, True)
    assert "chose ddp:" in choice.summary() and "ddp without selective recompute" in choice.summary()


def test_just_below_ddp_picks_fsdp2_then_checkpointing_of_more_and_more_blocks(deep_config):
    """Below fsdp2, the fewest checkpointed blocks that fit: every 4th (3 of 12 blocks), every 2nd, every one."""
    ddp, fsdp2 = _peak(deep_config, "ddp"), _peak(deep_config, "fsdp2")
    fourth, second, every = (_peak(deep_config, "fsdp2", f"parallel.activation_checkpointing={n}")
                             for n in ("4", "2", "true"))
    assert every < second < fourth < fsdp2 < ddp  # the model is sized so that each fallback saves memory
    parallel, choice = choose_strategy(_cfg(deep_config), WORLD, ddp - 1)
    assert (parallel.strategy, parallel.activation_checkpointing) == ("fsdp2", False)
    assert "chose fsdp2:" in choice.summary() and "too big" in choice.summary()
    for budget, chosen, name in ((fsdp2 - 1, 4, "fsdp2 + activation checkpointing of every 4th block"),
                                 (fourth - 1, 2, "fsdp2 + activation checkpointing of every 2nd block"),
                                 (second - 1, True, "fsdp2 + activation checkpointing")):
        parallel, choice = choose_strategy(_cfg(deep_config), WORLD, budget)
        assert (parallel.strategy, parallel.activation_checkpointing) == ("fsdp2", chosen)
        assert choice.activation_checkpointing == chosen and f"chose {name}:" in choice.summary()


def test_checkpointing_asked_for_is_never_lessened(deep_config):
    """With parallel.activation_checkpointing=true set, auto does not try checkpointing fewer blocks."""
    every = _peak(deep_config, "fsdp2", "parallel.activation_checkpointing=true")
    parallel, choice = choose_strategy(_cfg(deep_config, "parallel.activation_checkpointing=true"), WORLD, every)
    assert (parallel.strategy, parallel.activation_checkpointing) == ("fsdp2", True)
    assert [name for name, _ in choice.peaks] == ["ddp + activation checkpointing", "fsdp2 + activation checkpointing"]


def test_every_nth_block_asked_for_still_tries_more_blocks(deep_config):
    """parallel.activation_checkpointing=4 with auto: every 2nd block is tried before every block."""
    fourth, second = (_peak(deep_config, "fsdp2", f"parallel.activation_checkpointing={n}") for n in (4, 2))
    parallel, choice = choose_strategy(_cfg(deep_config, "parallel.activation_checkpointing=4"), WORLD, fourth - 1)
    assert (parallel.strategy, parallel.activation_checkpointing) == ("fsdp2", 2)
    assert [name for name, _ in choice.peaks][-2:] == ["fsdp2 + activation checkpointing of every 4th block",
                                                       "fsdp2 + activation checkpointing of every 2nd block"]
    assert choice.peaks[-1][1] == second


def test_compiled_blocks_never_get_the_offload_from_auto(deep_config):
    """parallel.compile with parallel.offload_activations (no checkpointing: accepted under auto): no candidate auto
    may pick checkpoints with the offload the compiler cannot enter."""
    from lora_dist.plan import _candidates

    cfg = _cfg(deep_config, "parallel.compile=true", "parallel.offload_activations=true")
    candidates = _candidates(cfg.parallel, WORLD, cfg.model.dtype)
    assert [name for name, _ in candidates][-3:] == [
        "fsdp2 + activation checkpointing of every 2nd block + compiled blocks",
        "fsdp2 + activation checkpointing + compiled blocks",
        "fsdp2 + activation checkpointing + one unit per weight + compiled blocks"]
    assert all(parallel.why_not_compiled() is None for _, parallel in candidates), candidates
    every = _peak(deep_config, "fsdp2", "parallel.compile=true", "parallel.activation_checkpointing=true")
    parallel, _ = choose_strategy(cfg, WORLD, every)
    assert (parallel.activation_checkpointing, parallel.offload_activations, parallel.compile) == (True, False, True)


def test_below_checkpointing_picks_weight_units_with_offloaded_activations(deep_config):
    checkpointed = _peak(deep_config, "fsdp2", "parallel.activation_checkpointing=true")
    leanest = _peak(deep_config, "fsdp2", "parallel.activation_checkpointing=true", "parallel.shard_unit=weight",
                    "parallel.offload_activations=true")
    assert leanest < checkpointed
    parallel, choice = choose_strategy(_cfg(deep_config), WORLD, checkpointed - 1)
    assert (parallel.strategy, parallel.activation_checkpointing, parallel.shard_unit,
            parallel.offload_activations) == ("fsdp2", True, "weight", True)
    assert len(choice.peaks) == 7 and choice.peaks[-1][1] == leanest
    assert "chose fsdp2 + activation checkpointing + one unit per weight + offloaded activations:" in choice.summary()


def test_nothing_fits_is_one_line_naming_the_smallest_peak(deep_config):
    leanest = _peak(deep_config, "fsdp2", "parallel.activation_checkpointing=true", "parallel.shard_unit=weight",
                    "parallel.offload_activations=true")
    with pytest.raises(ConfigError) as err:
        choose_strategy(_cfg(deep_config), WORLD, leanest - 1)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"{leanest / GB:.2f} GB (fsdp2 + activation checkpointing + one unit per weight + offloaded activations)" \
        in message
    assert "more ranks" in message and "model.dtype=bfloat16" in message and "train.seq_len" in message


def test_one_rank_chooses_between_unsharded_runs(deep_config):
    parallel, choice = choose_strategy(_cfg(deep_config), 1, 1000 * GB)
    assert parallel.strategy == "none" and choice.peaks[0][0] == "none without selective recompute"


#: fsdp2-only keys an auto config may carry (configs/llama31_70b_8x_lora.yaml sets shard_unit=weight), with the world
#: size whose replicated candidate (ddp, or none on one rank) is chosen.
FSDP2_ONLY = [
    (WORLD, ["parallel.reshard_after_forward=node"]),
    (WORLD, ["parallel.shard_unit=weight"]),
    (WORLD, ["parallel.dp_shard=2"]),
    (WORLD, ["parallel.dp_replicate=2", "parallel.reshard_after_forward=2"]),
    (1, ["parallel.shard_unit=weight", "parallel.reshard_after_forward=node"]),
    (WORLD, ["parallel.cpu_offload=true"]),
]


@pytest.mark.parametrize("world,extra", FSDP2_ONLY, ids=[" ".join(e) for _, e in FSDP2_ONLY])
def test_a_replicated_choice_records_a_config_export_reads_back(deep_config, world, extra):
    """auto choosing ddp/none over a config with fsdp2-only keys: the resolved config (the run's config.json) loads
    back as lora-dist export loads it; those keys carried into ddp made it refuse the run dir."""
    cfg = _cfg(deep_config, *extra)
    parallel, _ = choose_strategy(cfg, world, 1000 * GB)
    assert parallel.strategy == ("ddp" if world > 1 else "none")
    recorded = config_from_dict(json.loads(json.dumps(config_to_dict(dataclasses.replace(cfg, parallel=parallel)))))
    assert recorded.parallel == parallel
    assert (parallel.reshard_after_forward, parallel.shard_unit, parallel.dp_replicate, parallel.dp_shard,
            parallel.cpu_offload) == (True, "block", 0, 0, False)


def test_auto_at_launch_plans_reshard_to_node_with_the_launchs_ranks_per_node(deep_config):
    """parallel.reshard_after_forward=node on 16 ranks, 4 per node: every block keeps a 1/4 shard after forward, and
    auto's fsdp2 candidate is planned so. It was planned as true (the shards not counted): with a budget between the
    two, auto picked fsdp2 without checkpointing, which holds more than the budget."""
    import torch

    from lora_dist.launch import LaunchEnv
    from lora_dist.session import resolve_strategy

    world = 16
    # the base sharded over all ranks (dp_replicate=1: a model that fits a node would be split per node)
    node, true = (_fsdp2(deep_config, world, f"parallel.reshard_after_forward={r}", "parallel.dp_replicate=1").total
                  for r in (4, "true"))
    assert node > true
    cfg = _cfg(deep_config, "parallel.reshard_after_forward=node", f"parallel.memory_gb={(true + 0.5) / GB}")
    env = LaunchEnv("torchrun", 0, 0, world, 4, 0, world // 4, "127.0.0.1", 0)
    resolved = resolve_strategy(cfg, env, torch.device("cpu")).parallel
    assert (resolved.strategy, resolved.reshard_after_forward) == ("fsdp2", "node")
    assert resolved.activation_checkpointing  # plain fsdp2 (node's shards counted) does not fit
    _, choice = choose_strategy(cfg, world, true, ranks_per_node=4)
    assert dict(choice.peaks)["fsdp2"] == node
    _, choice = choose_strategy(cfg, world, true, ranks_per_node=16)  # one node: as true
    assert dict(choice.peaks)["fsdp2"] == true


def _fsdp2(path: Path, world: int, *extra: str):
    return plan_memory(load_config(None, [f"model.path={path}", "parallel.strategy=fsdp2", "lora.r=4",
                                          "train.micro_batch_size=4", "train.seq_len=512", *extra]), world)


def test_memory_gb_is_the_budget_and_zero_is_refused_below(deep_config):
    import torch

    assert memory_budget(12.5, torch.device("cpu"), 8) == int(12.5 * GB)
    assert memory_budget(12.5, torch.device("cuda", 0), 8) == int(12.5 * GB)  # set: whatever the device
    assert memory_budget(0, torch.device("cpu"), 2) * 2 <= memory_budget(0, torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="parallel.memory_gb must be >= 0"):
        _cfg(deep_config, "parallel.memory_gb=-1")


def test_the_plan_splits_fsdp2_over_nodes_as_training_does(deep_config, monkeypatch):
    """fsdp2 with dp_replicate and dp_shard unset on several nodes: training shards the base within a node where
    the model fits there (one replica group per node), else over all ranks (session.resolve_hybrid); the plan
    assumed all ranks always, so it printed a base shard (and a peak) a multi-node run would not hold."""
    import lora_dist.plan as plan_mod

    cfg = load_config(None, [f"model.path={deep_config}", "parallel.strategy=fsdp2", "lora.r=4",
                             "train.micro_batch_size=4", "train.seq_len=512"])
    one_node = plan_memory(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp_replicate=1)),
                           4, ranks_per_node=4)
    for budget, replicas in ((one_node.total, 4), (one_node.total - 1, 1)):
        got = plan_memory(cfg, 16, budget=budget, ranks_per_node=4)
        assert got.dp_replicate == replicas, got.hybrid
        pinned = dataclasses.replace(cfg.parallel, dp_replicate=replicas, dp_shard=16 // replicas)
        assert got.total == plan_memory(dataclasses.replace(cfg, parallel=pinned), 16, ranks_per_node=4).total
        assert ("dp_replicate=4 x dp_shard=4, the model fits in one node's 4 ranks (predicted peak" if replicas > 1
                else "the base sharded over all 16 ranks, as training chooses it on 4 nodes of 4 ranks: the model "
                "does not fit in one node's 4 ranks") in got.table()
    assert plan_memory(cfg, 4, budget=1, ranks_per_node=4).hybrid == ""  # one node: nothing to choose
    assert plan_memory(cfg, 16, budget=one_node.total).dp_replicate == 1  # no node size given: not split on a guess
    # Without parallel.memory_gb the budget is this host's memory shared by a node's ranks (as training shares it),
    # not by all of them.
    monkeypatch.setattr(plan_mod, "host_memory", lambda: 64 * one_node.total)
    assert plan_memory(cfg, 64, ranks_per_node=16).dp_replicate == 4  # 64/16 of it per rank: fits
    got = plan_memory(_cfg(deep_config), 64, ranks_per_node=16)
    assert f"the budget of {4 * one_node.total / GB:.2f} GB" in got.choice.summary(), got.choice.summary()


def test_plan_cli_shows_the_choice(deep_config, capsys):
    from lora_dist.cli import main

    ddp = _peak(deep_config, "ddp")
    overrides = [f"model.path={deep_config}", "parallel.strategy=auto", "lora.r=4", "train.micro_batch_size=4",
                 "train.seq_len=512", f"parallel.memory_gb={(ddp - 1) / GB}"]
    assert main(["plan", *overrides, "--world-size", str(WORLD)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("parallel.strategy=auto chose fsdp2:") and "\nstrategy=fsdp2 world_size=4" in out
    assert main(["plan", *overrides[:-1], "parallel.memory_gb=0.000001", "--world-size", str(WORLD)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.dist
def test_two_rank_auto_run_equals_the_strategy_it_chose(tiny_checkpoint, tmp_path):
    from lora_dist.demo import write_demo_data

    base = tiny_checkpoint("llama", hidden=64, layers=2)
    data = write_demo_data(tmp_path / "data.jsonl", n=100)
    common = ["train", f"model.path={base}", f"data.path={data}", "train.steps=2", "train.seq_len=32",
              "train.lr=5e-3", "train.warmup_steps=1", "data.eval_fraction=0", "lora.r=4", "checkpoint.every=0"]
    auto = ranks(2, "-m", "lora_dist.cli", *common, f"output.dir={tmp_path / 'auto'}", "parallel.strategy=auto",
                 "parallel.memory_gb=100")
    assert "parallel.strategy=auto chose ddp" in auto.stdout + auto.stderr
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["parallel"]["strategy"] == "ddp"  # recorded
    ranks(2, "-m", "lora_dist.cli", *common, f"output.dir={tmp_path / 'ddp'}", "parallel.strategy=ddp")
    assert_same_adapter(tmp_path / "auto" / "adapter", tmp_path / "ddp" / "adapter", atol=1e-6)


def test_a_gpus_budget_is_its_free_memory_less_a_reserve(monkeypatch):
    """Not the GPU's total: the CUDA context, NCCL's buffers, fragmentation and other processes are not in the
    planner's peak (an 80 GB H100 with 2 GB taken: 78 - 8 = 70 GB)."""
    import torch

    from lora_dist.plan import GPU_RESERVE

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (78 * GB, 80 * GB))
    assert GPU_RESERVE == 0.10
    assert memory_budget(0, torch.device("cuda", 1), 8) == 70 * GB
    assert asked == [torch.device("cuda", 1)]  # this rank's GPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * GB, 80 * GB))
    assert memory_budget(0, torch.device("cuda", 0), 8) == 0  # less free than the reserve: nothing fits

