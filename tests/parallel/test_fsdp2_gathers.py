"""What FSDP2 gathers in a training step: the frozen base only where a computation needs it.

The output head is never gathered when the loss runs over its vocabulary shards (the default,
:class:`lora_dist.loss.ShardedHeadLoss`, where that holds less than gathering it), nor the input embedding
when it looks up on its vocabulary shards (:mod:`lora_dist.parallel.embedding`, the same rule); a gathered
embedding is not gathered again in backward (token ids have no gradient: FSDP2's backward prefetch would gather it for nothing).
Every all-gather FSDP2 issues is recorded by the names of the params it gathers, in a fake
world of 2 ranks, with activation checkpointing (its recompute is where a stray gather hides).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from lora_dist.config import load_config
from lora_dist.lora import inject_lora, lora_parameters
from lora_dist.parallel import parallelize
from lora_dist.session import make_engine


def _unit(param_name: str) -> str:
    """The unit a param belongs to: ``model.layers.N`` for a block's, else its module (``lm_head``...)."""
    parts = param_name.split(".")
    return ".".join(parts[:3]) if parts[1:2] == ["layers"] else ".".join(parts[:-1])


@pytest.fixture
def gathers(monkeypatch):
    """``{"forward": set, "backward": set}`` of the units (first param's name) FSDP2 all-gathers, per phase."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module
    from torch.testing._internal.distributed.fake_pg import FakeStore

    seen: dict[str, set[str]] = {"forward": set(), "backward": set()}
    phase = {"now": "forward"}
    real = group_module.foreach_all_gather

    def recording(fsdp_params, *args, **kwargs):
        seen[phase["now"]].add(_unit(fsdp_params[0]._param_fqn))
        return real(fsdp_params, *args, **kwargs)

    monkeypatch.setattr(group_module, "foreach_all_gather", recording)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield seen, phase
    dist.destroy_process_group()


@pytest.mark.parametrize("gather,seq_len,gathered", [
    (False, 16, False),  # the loss on the head's vocabulary shards, the lookup on the embedding's
    (True, 16, True),  # asked to gather them
    (False, 4096, True),  # 2 x 2 x 4096 tokens' hidden states would outweigh the vocabulary's rows: gathered
])
def test_the_head_and_embedding_are_gathered_only_where_asked_or_cheaper(tiny_checkpoint, tiny_model, gathers,
                                                                         gather, seq_len, gathered):
    seen, phase = gathers
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    flag = str(gather).lower()
    cfg = load_config(None, [f"model.path={base}", "parallel.strategy=fsdp2", "parallel.activation_checkpointing=true",
                             f"parallel.gather_head={flag}", f"parallel.gather_embedding={flag}", "lora.r=4",
                             "train.micro_batch_size=2", f"train.seq_len={seq_len}"])
    model = tiny_model("llama", hidden=64, layers=2)
    inject_lora(model, cfg.lora)
    parallelize(model, cfg.parallel, torch.device("cpu"))
    engine = make_engine(model, torch.optim.AdamW(lora_parameters(model), lr=1e-3), cfg.parallel, cfg.train,
                         torch.device("cpu"))
    assert (engine.embedding is None) == gathered
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second step: FSDP2's lazy init and the optimizer state are behind us
            for phase_seen in seen.values():
                phase_seen.clear()
            phase["now"] = "forward"
            loss = engine.forward_loss_sum({"input_ids": ids}, ids)
            phase["now"] = "backward"
            engine.backward(loss)
            engine.step(1e-3)
    # FSDP2 (torch 2.13, 2.14) warns about each view a unit returns; the head's stand-ins return none.
    assert not [str(w.message) for w in caught if "view" in str(w.message)]

    blocks = {f"model.layers.{i}" for i in range(2)}
    assert ("lm_head" in seen["forward"]) == gathered, seen
    assert ("model.embed_tokens" in seen["forward"]) == gathered, seen
    assert blocks <= seen["forward"], seen
    assert seen["backward"] == blocks, seen  # recomputed and differentiated blocks; neither head nor embedding
    with torch.no_grad(), engine.head_loss.installed():
        assert model(input_ids=ids, use_cache=False).logits._base is None


def test_a_hook_on_the_embedding_gets_the_gathered_lookup(tiny_checkpoint, tiny_model, gathers):
    """Someone else's forward hook on the embedding (TRL's NEFTune adds noise to its output) keeps working: the
    lookup on the vocabulary shards steps aside, the embedding is gathered and the hook sees its output."""
    seen, phase = gathers
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    cfg = load_config(None, [f"model.path={base}", "parallel.strategy=fsdp2", "lora.r=4", "train.micro_batch_size=2",
                             "train.seq_len=16"])
    model = tiny_model("llama", hidden=64, layers=2)
    inject_lora(model, cfg.lora)
    parallelize(model, cfg.parallel, torch.device("cpu"))
    engine = make_engine(model, torch.optim.AdamW(lora_parameters(model), lr=1e-3), cfg.parallel, cfg.train,
                         torch.device("cpu"))
    assert engine.embedding is not None
    outputs = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: outputs.append(out.shape))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.forward_loss_sum({"input_ids": ids}, ids)
    assert outputs == [(2, 16, 64)] and "model.embed_tokens" in seen["forward"], (outputs, seen)
    handle.remove()
    seen["forward"].clear()
    engine.forward_loss_sum({"input_ids": ids}, ids)
    assert "model.embed_tokens" not in seen["forward"], seen

