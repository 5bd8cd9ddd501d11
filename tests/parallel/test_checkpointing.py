"""Activation checkpointing of every block or of every Nth, with the checkpointed block inputs in host memory
(``parallel.offload_activations``) or not.

On the CPU host and device memory are one, so what is checked is the mechanism: the
blocks recomputed are the ones asked for, the checkpointed block inputs the forward
produced are released (the host copies are what backward uses), the bytes that went
are the planner's ``offloaded`` term to the byte, and loss and LoRA gradients equal
those of the plain model.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from lora_dist.blocks import find_blocks
from lora_dist.config import ConfigError, load_config
from lora_dist.lora import inject_lora, lora_parameters
from lora_dist.parallel.checkpointing import checkpointed_blocks, enable_activation_checkpointing
from lora_dist.plan import plan_memory

BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoint):
    return tiny_checkpoint("llama", hidden=64, layers=3)


def _model(path, offload: bool | None, every: bool | int = True):
    """The tiny model with LoRA; ``offload`` None: no checkpointing; else checkpointed (each block, or every
    ``every``-th), offloaded or not."""
    import transformers as tf

    cfg = load_config(None, [f"model.path={path}", "lora.r=4", "lora.target_modules=all-linear"])
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inject_lora(model, cfg.lora)
    for q in lora_parameters(model):  # B starts at zero: give the gradients through B something to carry
        torch.nn.init.normal_(q, std=0.02)
    model.train()
    hooks = enable_activation_checkpointing(model, offload=offload, every=every) if offload is not None else None
    return model, hooks, cfg


def _ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model):
    ids = _ids(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [q.grad.clone() for q in lora_parameters(model)]


@pytest.mark.parametrize("every", [True, 2])
def test_checkpointing_gives_the_same_loss_and_gradients(checkpoint_dir, every):
    plain_loss, plain = _loss_and_grads(_model(checkpoint_dir, None)[0])
    for offload in (False, True):
        loss, grads = _loss_and_grads(_model(checkpoint_dir, offload, every)[0])
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
        for got, want in zip(grads, plain, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("every,runs", [(True, [2, 2, 2]), (2, [2, 1, 2]), (4, [2, 1, 1])])
def test_the_blocks_asked_for_and_only_those_run_again_in_backward(checkpoint_dir, every, runs):
    model, _, _ = _model(checkpoint_dir, False, every)
    counted = [0] * model.config.num_hidden_layers
    for i, block in enumerate(find_blocks(model)):  # (the recompute runs the block's forward, not its hooks)
        block.mlp.register_forward_pre_hook(lambda *_, i=i: counted.__setitem__(i, counted[i] + 1))
    _loss_and_grads(model)
    assert counted == runs
    assert [i for i, n in enumerate(runs) if n == 2] == checkpointed_blocks(len(runs), every)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("every", [True, 2])
def test_block_inputs_wait_in_host_copies_the_plan_counts(checkpoint_dir, offload, every):
    """After forward, checkpointing alone holds every block's input; offloaded, no checkpointed block's input is
    held (their host copies are; a block not checkpointed keeps its own for backward), and the bytes copied are the
    planner's ``offloaded`` term exactly."""
    model, hooks, cfg = _model(checkpoint_dir, offload, every)
    inputs: list[weakref.ref] = []
    for block in find_blocks(model):
        block.register_forward_pre_hook(lambda _m, args, kwargs: inputs.append(weakref.ref(args[0]))
                                        if args else inputs.append(weakref.ref(kwargs["hidden_states"])),
                                        with_kwargs=True)
    ids = _ids(model)
    loss = model(input_ids=ids, labels=ids).loss
    held = [ref() is not None for ref in inputs]
    assert len(held) == model.config.num_hidden_layers
    if offload:
        checkpointed = checkpointed_blocks(len(held), every)
        assert held == [i not in checkpointed for i in range(len(held))], held
        plan = plan_memory(load_config(None, [f"model.path={checkpoint_dir}", "lora.r=4",
                                              "lora.target_modules=all-linear", "parallel.strategy=none",
                                              f"parallel.activation_checkpointing={str(every).lower()}",
                                              "parallel.offload_activations=true", f"train.micro_batch_size={BATCH}",
                                              f"train.seq_len={SEQ}"]), 1)
        assert hooks.packed_bytes == plan.offloaded > 0
    else:
        assert hooks is None and all(held), held
    loss.backward()
    assert all(q.grad is not None for q in lora_parameters(model))


def test_non_reentrant_checkpointing_leaves_the_embedding_output_without_grad(checkpoint_dir):
    """Hugging Face's hook making the embedding output require grad (for reentrant checkpointing) is removed: the
    first block's input gradient is never computed."""
    model, _, _ = _model(checkpoint_dir, False)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out.requires_grad))
    ids = _ids(model)
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [False]
    assert all(q.grad is not None for q in lora_parameters(model))


def test_offload_without_checkpointing_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="activation_checkpointing=true") as e:
        load_config(None, ["parallel.offload_activations=true"])
    assert "\n" not in str(e.value)


def test_every_nth_block_needs_blocks_with_their_own_switch(checkpoint_dir):
    """Blocks that do not switch checkpointing on and off each (here the MLPs named as the blocks) are refused for
    every Nth block, in one line naming the fix; every block is checkpointed all the same."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    model._no_split_modules = ["LlamaMLP"]
    with pytest.raises(ValueError, match="parallel.activation_checkpointing=2 needs blocks .* set it to true") as e:
        enable_activation_checkpointing(model, every=2)
    assert "\n" not in str(e.value)
    enable_activation_checkpointing(model, every=True)


@pytest.mark.parametrize("value,parsed", [("true", True), ("1", True), ("false", False), ("0", False), ("3", 3)])
def test_checkpointing_takes_true_false_or_every_nth_block(value, parsed):
    cfg = load_config(None, [f"parallel.activation_checkpointing={value}"])
    assert cfg.parallel.activation_checkpointing is parsed if isinstance(parsed, bool) else \
        cfg.parallel.activation_checkpointing == parsed


@pytest.mark.parametrize("value", ["-2", "often"])
def test_bad_checkpointing_values_are_refused_in_one_line(value):
    with pytest.raises(ConfigError, match="parallel.activation_checkpointing must be") as e:
        load_config(None, [f"parallel.activation_checkpointing={value}"])
    assert "\n" not in str(e.value)
