"""Activation checkpointing with the checkpointed block inputs in host memory (``parallel.offload_activations``).

On the CPU host and device memory are one, so what is checked is the mechanism: the
block inputs the forward produced are released (the host copies are what backward
uses), the bytes that went are the planner's ``offloaded`` term to the byte, and
loss and LoRA gradients equal those of plain checkpointing.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from lora_dist.config import ConfigError, load_config
from lora_dist.lora import inject_lora, lora_parameters
from lora_dist.parallel.checkpointing import enable_activation_checkpointing
from lora_dist.parallel.parallelize import find_blocks
from lora_dist.plan import plan_memory

BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoint):
    return tiny_checkpoint("llama", hidden=64, layers=3)


def _model(path, offload: bool | None):
    """The tiny model with LoRA; ``offload`` None: no checkpointing; else checkpointed, offloaded or not."""
    import transformers as tf

    cfg = load_config(None, [f"model.path={path}", "lora.r=4", "lora.target_modules=all-linear"])
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inject_lora(model, cfg.lora)
    for q in lora_parameters(model):  # B starts at zero: give the gradients through B something to carry
        torch.nn.init.normal_(q, std=0.02)
    model.train()
    hooks = enable_activation_checkpointing(model, offload=offload) if offload is not None else None
    return model, hooks, cfg


def _ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model):
    ids = _ids(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [q.grad.clone() for q in lora_parameters(model)]


def test_offloaded_checkpointing_gives_the_same_loss_and_gradients(checkpoint_dir):
    plain_loss, plain = _loss_and_grads(_model(checkpoint_dir, None)[0])
    for offload in (False, True):
        loss, grads = _loss_and_grads(_model(checkpoint_dir, offload)[0])
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
        for got, want in zip(grads, plain, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("offload", [False, True])
def test_block_inputs_wait_in_host_copies_the_plan_counts(checkpoint_dir, offload):
    """After forward, checkpointing alone holds every block's input; offloaded, none of them is held (their host
    copies are), and the bytes copied are the planner's ``offloaded`` term exactly."""
    model, hooks, cfg = _model(checkpoint_dir, offload)
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
        assert not any(held), held
        plan = plan_memory(load_config(None, [f"model.path={checkpoint_dir}", "lora.r=4",
                                              "lora.target_modules=all-linear", "parallel.strategy=none",
                                              "parallel.activation_checkpointing=true",
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
