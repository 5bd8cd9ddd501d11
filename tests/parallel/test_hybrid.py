"""Hybrid sharding (``parallel.dp_replicate x parallel.dp_shard``, FSDP2's HSDP) and resharding after forward to
a node's ranks: the mesh shape rules, the automatic choice, and 4 ranks on one machine equal to 1 process."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from distutil import assert_same_run, lora_dist, ranks
from safetensors.torch import load_file

from lora_dist.config import ConfigError, ParallelConfig, load_config
from lora_dist.launch import LaunchEnv
from lora_dist.parallel import dp_mesh_shape
from lora_dist.parallel.parallelize import replicated_if_unsharded, reshard_size
from lora_dist.plan import plan_memory
from lora_dist.session import build, resolve_hybrid

STEPS = 3
LR = 5e-3
#: As tests/test_train_dist.py derives it: 1/300 of the largest possible move (lr per step).
ADAPTER_ATOL = LR * STEPS / 300


# ----------------------------------------------------------------------------- rules (one process)


@pytest.mark.parametrize("replicate,shard,world,expected", [
    (0, 0, 4, (1, 4)), (2, 0, 4, (2, 2)), (0, 2, 4, (2, 2)), (2, 2, 4, (2, 2)), (4, 0, 4, (4, 1)), (0, 0, 1, (1, 1)),
])
def test_dp_mesh_shape(replicate, shard, world, expected):
    assert dp_mesh_shape(ParallelConfig(dp_replicate=replicate, dp_shard=shard), world) == expected


@pytest.mark.parametrize("replicate,shard,world", [(3, 0, 4), (0, 3, 4), (2, 3, 4), (2, 2, 8)])
def test_dp_mesh_shape_must_multiply_to_the_ranks(replicate, shard, world):
    with pytest.raises(ConfigError, match=f"must multiply to the {world} ranks launched") as e:
        dp_mesh_shape(ParallelConfig(dp_replicate=replicate, dp_shard=shard), world)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,world,base_dtype,expected", [
    ({}, 1, "float32", "none"),  # one process: FSDP2 would shard over one rank
    ({"dp_replicate": 2, "dp_shard": 1}, 2, "float32", "ddp"),  # replica groups of one rank each
    ({"dp_replicate": 4}, 4, "bfloat16", "ddp"),
    ({}, 2, "float32", "fsdp2"),  # the base really sharded
    ({"dp_replicate": 2}, 4, "float32", "fsdp2"),
    ({"cpu_offload": True}, 1, "float32", "fsdp2"),  # host-resident shards: FSDP2's, over one rank too
    ({"mixed_precision": "bfloat16"}, 1, "float32", "fsdp2"),  # FSDP2's cast of the base
    ({"mixed_precision": "bfloat16"}, 1, "bfloat16", "none"),  # a bf16 base: nothing to cast
])
def test_fsdp2_over_one_shard_rank_runs_replicated(overrides, world, base_dtype, expected):
    cfg = ParallelConfig(strategy="fsdp2", shard_unit="weight", reshard_after_forward=2, **overrides)
    got = replicated_if_unsharded(cfg, world, base_dtype)
    assert got.strategy == expected
    if expected == "fsdp2":
        assert got is cfg
    else:  # nothing fsdp2-only is left to refuse; the rest of the config is kept
        assert (got.dp_replicate, got.dp_shard, got.shard_unit, got.reshard_after_forward) == (0, 0, "block", True)
        assert dataclasses.replace(got, strategy="fsdp2", dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard,
                                   shard_unit="weight", reshard_after_forward=2) == cfg
        got.check_strategy()
    for other in ("ddp", "none", "zero3"):
        assert replicated_if_unsharded(ParallelConfig(strategy=other), 1).strategy == other


def test_the_plan_of_fsdp2_on_one_rank_is_what_runs(base):
    cfg = load_config(None, [f"model.path={base}"])
    one, two = plan_memory(cfg, 1), plan_memory(cfg, 2)
    assert one.strategy == "none" and "fsdp2 over one shard rank shards nothing: it runs as none" in one.table()
    assert one.total == plan_memory(load_config(None, [f"model.path={base}", "parallel.strategy=none"]), 1).total
    assert two.strategy == "fsdp2" and not two.runs_as


def test_fsdp2_on_one_process_builds_the_plain_model_and_says_so(base, caplog):
    """``build`` (every entry point's setup): no FSDP2 module, the one-process engine, a log line."""
    from torch.distributed.fsdp import FSDPModule

    from lora_dist.model_dir import ModelDir
    from lora_dist.parallel.engine import DDPEngine, FSDP2Engine

    cfg = load_config(None, [f"model.path={base}", "parallel.strategy=fsdp2"])
    with caplog.at_level(logging.INFO, logger="lora_dist"):
        model, engine = build(cfg, _env(1, 1), torch.device("cpu"), ModelDir(base), None)
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    assert not isinstance(engine, (FSDP2Engine, DDPEngine))
    assert "fsdp2 over one shard rank shards nothing; running as none" in caplog.text


@pytest.mark.parametrize("value,shard,local,expected", [
    (True, 4, 2, True), (False, 4, 2, False),
    ("node", 4, 2, 2),  # gathered in backward within the node
    ("node", 2, 2, True),  # one node per shard group already: plain resharding
    ("node", 4, -1, True),  # the launcher does not say how many ranks a node runs
    (2, 8, 1, 2), (1, 4, 2, False), (8, 4, 2, True),
])
def test_reshard_size(value, shard, local, expected):
    got = reshard_size(ParallelConfig(reshard_after_forward=value), shard, local)
    assert got == expected and type(got) is type(expected)


def test_reshard_size_must_divide_the_shard_group():
    with pytest.raises(ConfigError, match="must divide the 4 ranks"):
        reshard_size(ParallelConfig(reshard_after_forward=3), 4, 2)


def test_config_keys_and_errors():
    cfg = load_config(None, ["parallel.dp_replicate=2", "parallel.dp_shard=4", "parallel.reshard_after_forward=node"])
    assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.reshard_after_forward) == (2, 4, "node")
    assert load_config(None, ["parallel.reshard_after_forward=2"]).parallel.reshard_after_forward == 2
    assert load_config(None, ["parallel.reshard_after_forward=false"]).parallel.reshard_after_forward is False
    for overrides, message in [
        (["parallel.strategy=ddp", "parallel.dp_replicate=2"], "applies to parallel.strategy=fsdp2 only, not ddp"),
        (["parallel.strategy=zero3", "parallel.reshard_after_forward=node"], "fsdp2 only, not zero3"),
        # false too: it was accepted and did nothing, where node and N were refused
        (["parallel.strategy=ddp", "parallel.reshard_after_forward=false"],
         "parallel.reshard_after_forward=false applies to parallel.strategy=fsdp2 only, not ddp"),
        (["parallel.dp_shard=-1"], "parallel.dp_shard must be >= 0"),
        (["parallel.reshard_after_forward=nodes"], "must be true, false, node or a rank count"),
        (["parallel.reshard_after_forward=0"], "a rank count must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)


def _env(world: int, local: int, rank: int = 0) -> LaunchEnv:
    return LaunchEnv("torchrun", rank, rank % local, world, local, rank // local, world // local, "10.0.0.1", 29500)


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("llama", hidden=64, layers=2)


def test_auto_is_one_replica_group_per_node_when_the_model_fits_a_node(base, caplog):
    cfg = load_config(None, [f"model.path={base}", "parallel.memory_gb=50"])
    with caplog.at_level(logging.INFO, logger="lora_dist"):
        got = resolve_hybrid(cfg, _env(8, 4), torch.device("cpu")).parallel
    assert (got.dp_replicate, got.dp_shard) == (2, 4)
    assert "hybrid sharding, dp_replicate=2 x dp_shard=4 (one replica group per node): the model fits in one " \
           "node's 4 ranks" in caplog.text


def test_auto_shards_over_all_ranks_when_a_node_is_too_small(base, caplog):
    cfg = load_config(None, [f"model.path={base}", "parallel.memory_gb=0.000001"])
    with caplog.at_level(logging.INFO, logger="lora_dist"):
        got = resolve_hybrid(cfg, _env(8, 4), torch.device("cpu")).parallel
    assert (got.dp_replicate, got.dp_shard) == (1, 8)
    assert "the base sharded over all 8 ranks of 2 nodes (dp_replicate=1): the model does not fit" in caplog.text


def test_auto_on_one_node_and_explicit_shapes_are_kept(base, caplog):
    cfg = load_config(None, [f"model.path={base}"])
    with caplog.at_level(logging.INFO, logger="lora_dist"):
        got = resolve_hybrid(cfg, _env(4, 4), torch.device("cpu")).parallel
    assert (got.dp_replicate, got.dp_shard) == (1, 4) and "dp_replicate" not in caplog.text
    cfg = load_config(None, [f"model.path={base}", "parallel.dp_shard=2"])  # explicit: no planner, any node layout
    got = resolve_hybrid(cfg, _env(8, 4), torch.device("cpu")).parallel
    assert (got.dp_replicate, got.dp_shard) == (4, 2)
    ddp = resolve_hybrid(load_config(None, [f"model.path={base}", "parallel.strategy=ddp"]), _env(8, 4),
                         torch.device("cpu")).parallel
    assert (ddp.dp_replicate, ddp.dp_shard) == (0, 0)  # only fsdp2 has a mesh shape


def test_reshard_to_node_becomes_the_nodes_rank_count_at_launch(base):
    """``parallel.reshard_after_forward=node`` is resolved where the launch environment is read, so
    ``parallelize`` gets a rank count."""
    cfg = load_config(None, [f"model.path={base}", "parallel.dp_replicate=1", "parallel.reshard_after_forward=node"])
    got = resolve_hybrid(cfg, _env(8, 4), torch.device("cpu")).parallel
    assert got.reshard_after_forward == 4 and reshard_size(got, got.dp_shard, 0) == 4


def test_units_resharded_to_a_node_share_one_post_forward_mesh(base):
    """FSDP2 makes a new mesh - process groups, NCCL communicators on GPUs - per unit given an integer
    reshard_after_forward; here every unit shares one, so the groups do not grow with the units."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    import transformers as tf
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lora_dist.config import LoRAConfig
    from lora_dist.lora import inject_lora
    from lora_dist.parallel import parallelize

    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(base))
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        before = len(c10d._world.pg_map)
        parallelize(model, ParallelConfig(reshard_after_forward=2, shard_unit="weight"), torch.device("cpu"))
        groups = [g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups]
        resharded = [g.post_forward_mesh_info for g in groups if g.post_forward_mesh_info not in (None, g.mesh_info)]
        assert len(resharded) > 10  # every weight, block and the embedding: kept 1/2 after forward
        assert len({id(info.mesh) for info in resharded}) == 1
        assert all(info.shard_mesh_size == 2 for info in resharded)
        assert len(c10d._world.pg_map) - before <= 2  # the post-forward mesh's two dimensions (not 2 per unit)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- 4 ranks on one machine


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """One process (global batch 8) and 4 ranks (micro-batch 2 each) of the same training, with merged exports."""
    from lora_dist.demo import write_demo_data

    root = tmp_path_factory.mktemp("hybrid")
    data = write_demo_data(root / "data.jsonl", n=200)
    common = [f"model.path={base}", f"data.path={data}", f"train.steps={STEPS}", "train.seq_len=32",
              f"train.lr={LR}", "train.warmup_steps=1", "data.eval_fraction=0", "lora.r=4",
              "lora.target_modules=[q_proj,v_proj,down_proj]", "checkpoint.every=0", "export.merged=true",
              "export.dtype=float32"]

    def train(name, nproc, *overrides):
        out = root / name
        args = ["train", *common, f"output.dir={out}", *overrides]
        if nproc == 1:
            lora_dist(*args)
        else:
            ranks(nproc, "-m", "lora_dist.cli", *args)
        return out

    return {"root": root, "train": train,
            "ref": train("ref", 1, "parallel.strategy=none", "train.micro_batch_size=8")}


def _merged(merged_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(merged_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.dist
@pytest.mark.parametrize("overrides", [
    ("parallel.dp_replicate=2", "parallel.dp_shard=2"),  # hybrid: 2 replica groups of 2 ranks
    ("parallel.reshard_after_forward=2",),  # sharded over 4, kept as 1/2 after forward: backward gathers over 2
], ids=["hybrid-2x2", "reshard-to-2"])
def test_four_ranks_equal_one_process(runs, overrides):
    name = "-".join(o.split("=")[0].split(".")[1] + o.split("=")[1] for o in overrides)
    out = runs["train"](name, 4, "parallel.strategy=fsdp2", "train.micro_batch_size=2", *overrides)
    ref = runs["ref"]
    assert_same_run(out, ref, ADAPTER_ATOL)
    parallel = json.loads((out / "config.json").read_text())["parallel"]
    expected = (2, 2) if "parallel.dp_replicate=2" in overrides else (0, 0)
    assert (parallel["dp_replicate"], parallel["dp_shard"]) == expected  # as given (0: chosen by each launch)
    # The merged export written from the shards (under hybrid: by one replica group) is the one process's.
    _assert_same_merged(out / "merged", ref)
    if expected == (2, 2):
        # `lora-dist export RUN_DIR` on 2 ranks: the run's 2 x 2 mesh is not the export's; it shards over its own.
        ranks(2, "-m", "lora_dist.cli", "export", str(out), "--out", str(out.parent / f"{name}-export2"))
        _assert_same_merged(out.parent / f"{name}-export2", ref)


def _assert_same_merged(got_dir, ref_run) -> None:
    """``got_dir`` holds ``ref_run``'s merged weights W0 + s B A within what adapters ``ADAPTER_ATOL`` apart can
    give (s r d (max|A| + max|B| + d), d = ADAPTER_ATOL), with a 2x margin."""
    got, want = _merged(got_dir), _merged(ref_run / "merged")
    assert set(got) == set(want) and want
    adapter = load_file(str(ref_run / "adapter" / "adapter_model.safetensors"))
    config = json.loads((ref_run / "adapter" / "adapter_config.json").read_text())
    d = ADAPTER_ATOL
    biggest = {part: max(float(t.abs().max()) for k, t in adapter.items() if part in k) for part in ("lora_A", "lora_B")}
    atol = config["lora_alpha"] * d * (biggest["lora_A"] + biggest["lora_B"] + d)  # s r = alpha
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    assert worst <= atol / 2, f"max |diff| {worst:.3g} is within 2x of the tolerance {atol:.3g}"


@pytest.mark.dist
def test_hybrid_layout_loads_own_rows_and_writes_each_element_once(base, tmp_path):
    """Under dp_replicate=2 x dp_shard=2 a rank holds and reads the rows of its dp_shard coordinate (half the base,
    as its peer in the other group does), and the export's writes cover every element exactly once."""
    ranks(4, "tests/dist_scripts/hybrid_layout.py", str(tmp_path), f"model.path={base}",
          "parallel.dp_replicate=2", "parallel.dp_shard=2", "lora.r=4")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, rep in enumerate(reports):
        assert rep["placements"] == ["(Replicate(), Shard(dim=0))"]
        assert rep["mesh"] == {"shape": [2, 2], "dims": ["dp_replicate", "dp_shard"], "coordinate": [r // 2, r % 2]}
        assert 0.45 <= rep["read_bytes"] / rep["base_full_bytes"] <= 0.55, rep["read_bytes"]
        # Same dp_shard coordinate, same rows, in both replica groups.
        assert rep["owned"] == reports[r % 2]["owned"]
    names = reports[0]["numel"]
    assert names
    for name, numel in names.items():
        nonempty = lambda span: span[1] > span[0]  # noqa: E731
        spans = sorted(tuple(rep["written"][name]) for rep in reports if nonempty(rep["written"][name]))
        # What group 0 owns is what is written.
        assert spans == sorted(tuple(reports[r]["owned"][name]) for r in (0, 1) if nonempty(reports[r]["owned"][name]))
        cursor = 0
        for start, end in spans:  # contiguous, no overlap, no gap
            assert start == cursor, (name, spans)
            cursor = end
        assert cursor == numel, (name, spans)
        assert all(rep["written"][name][0] == rep["written"][name][1] for rep in reports[2:])  # group 1: nothing
