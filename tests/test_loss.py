"""The training loss: the next-token cross-entropy sum that every strategy divides by the global token count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_dist.loss import IGNORE, n_targets, token_loss_sum


def test_equals_the_transformers_causal_lm_loss(tiny_model):
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    labels = ids.clone()
    labels[0, :5] = IGNORE  # a masked prompt
    labels[2, 11:] = IGNORE  # padding
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        mine = token_loss_sum(out.logits, labels) / n_targets(labels)
    assert n_targets(labels) == 3 * 16 - 4 - 6
    torch.testing.assert_close(mine, out.loss, rtol=1e-6, atol=0)


def test_does_not_copy_the_logits(monkeypatch):
    """Batches of several sequences: cross-entropy reads the logits in place, the labels are shifted."""
    seen = []
    real = F.cross_entropy

    def spy(input, target, *args, **kwargs):
        seen.append(input)
        return real(input, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    logits = torch.randn(4, 9, 50, requires_grad=True)
    labels = torch.randint(0, 50, (4, 9))
    loss = token_loss_sum(logits, labels)
    assert seen[0].data_ptr() == logits.data_ptr()
    expected = sum(real(logits[b, :-1], labels[b, 1:], reduction="sum") for b in range(4))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.all(logits.grad[:, -1] == 0)  # the last position predicts nothing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_summed_in_fp32(dtype):
    logits = torch.randn(2, 6, 30).to(dtype)
    labels = torch.randint(0, 30, (2, 6))
    loss = token_loss_sum(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, token_loss_sum(logits.float(), labels))
