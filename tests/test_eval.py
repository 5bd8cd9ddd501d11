"""``lora-dist eval``: the validation loss of a run's adapter, or of the base, sharded like training.

Checked against the end-of-training eval of the same run, against transformers computing
the base's loss block by block, and W ranks (fsdp2, zero3) against 1 process.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from distutil import assert_same_losses, logged, lora_dist, ranks
from lora_dist.demo import write_demo_data

STEPS = 3


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
    """A finished 1-process run whose last 25% of blocks are held out, and its config overrides: evaluated on all of
    them (train.eval_batches covers them) at step 2, which is not logged (every 3 steps), and at the end."""
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    root = tmp_path_factory.mktemp("eval")
    data = write_demo_data(root / "data.jsonl", n=120)
    common = [f"model.path={base}", f"data.path={data}", "data.eval_fraction=0.25", "train.seq_len=32",
              "train.micro_batch_size=3", "train.eval_batches=1000", "lora.r=4", "lora.target_modules=[q_proj,v_proj]",
              f"output.dir={root / 'run'}"]
    lora_dist("train", *common, f"train.steps={STEPS}", "train.lr=5e-3", "parallel.strategy=none",
              "train.eval_every=2", "train.log_every=3")
    return {"common": common, "out": root / "run", "base": base}


def _eval(run, nproc: int, *args: str) -> dict:
    argv = ["eval", *run["common"], "--json", *args]
    proc = lora_dist(*argv) if nproc == 1 else ranks(nproc, "-m", "lora_dist.cli", *argv)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_adapter_eval_equals_the_runs_own_final_eval(run):
    """An eval at a step that is not logged is logged all the same (it was dropped)."""
    result = _eval(run, 1, "parallel.strategy=none")
    rows = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, STEPS]
    final = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert result["model"] == str(run["out"] / "adapter")
    assert result["loss"] == pytest.approx(final, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["blocks"] > 3 and result["tokens"] > 0


@pytest.mark.dist
def test_evals_during_training_are_the_same_on_two_ranks_as_on_one(run, tmp_path):
    """The same global batch on 1 process (2 micro-batches a step) and 2 ranks evaluates the same held-out blocks:
    the first train.eval_batches global micro-batches were twice as many blocks on 2 ranks."""
    overrides = [*run["common"][:-1], "train.steps=2", "train.lr=5e-3", "train.eval_every=1", "train.eval_batches=1",
                 "train.micro_batch_size=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    lora_dist("train", *overrides, f"output.dir={one}", "parallel.strategy=none", "train.grad_accum=2")
    ranks(2, "-m", "lora_dist.cli", "train", *overrides, f"output.dir={two}", "parallel.strategy=ddp")
    want = logged(one, "eval_loss")
    assert len(want) == 3  # steps 1, 2 and the end
    assert_same_losses(logged(two, "eval_loss"), want, atol=1e-5 * want[0])


def test_evals_during_training_take_blocks_spread_over_the_held_out_set():
    """A mixture's held-out blocks are packed source by source: the first blocks were one source's."""
    from lora_dist.train import eval_blocks

    assert eval_blocks(33, 4) == [0, 8, 16, 24]
    assert len(set(eval_blocks(33, 32))) == 32 and eval_blocks(33, 32)[-1] == 31
    assert eval_blocks(5, 12) == eval_blocks(5, None) == [0, 1, 2, 3, 4]


def test_evals_keep_no_autograd_graph():
    """Every eval forward runs without autograd: a graph chained through the summed loss would hold every eval
    batch's activations until the last (memory growing with the held-out set, on every rank)."""
    from lora_dist.launch import LaunchEnv
    from lora_dist.train import eval_sums

    head, grad_enabled = torch.nn.Linear(4, 1), []

    class Engine:
        device, model = torch.device("cpu"), head

        def loss_sum(self, batch):
            grad_enabled.append(torch.is_grad_enabled())
            return head(batch["x"]).sum()

    class Blocks:
        def __len__(self):
            return 5

        def inputs(self, idx, device):
            return {"x": torch.arange(4.0).repeat(len(idx), 1) + torch.tensor(idx)[:, None], "n_targets": len(idx)}

    loss, tokens = eval_sums(Engine(), Blocks(), 2, None, LaunchEnv("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0))
    assert grad_enabled == [False] * 3 and tokens == 5
    with torch.no_grad():
        want = float(head(Blocks().inputs(list(range(5)), None)["x"]).sum())
    assert loss == pytest.approx(want, rel=1e-6)


def test_base_only_equals_transformers_block_by_block(run):
    from transformers import AutoModelForCausalLM

    from lora_dist.config import load_config
    from lora_dist.data import load_splits, load_tokenizer, model_kwargs
    from lora_dist.loss import n_targets, token_loss_sum

    result = _eval(run, 1, "parallel.strategy=none", "--base-only")
    cfg = load_config(None, run["common"])
    _, held_out = load_splits(cfg, load_tokenizer(run["base"]), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for i in range(len(held_out)):
            batch = held_out.inputs([i])
            total += float(token_loss_sum(model(**model_kwargs(batch, model.config)).logits, batch["labels"]))
            tokens += n_targets(batch["labels"])
    assert result["model"] == "base" and result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert result["loss"] != pytest.approx(_eval(run, 1, "parallel.strategy=none")["loss"], rel=1e-4)


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_two_ranks_equal_one_process(run, strategy):
    one = _eval(run, 1, "parallel.strategy=none")
    two = _eval(run, 2, f"parallel.strategy={strategy}")
    # 3 blocks per micro-batch on 2 ranks: the last global batch is partial, and each block still counts once
    assert (two["blocks"], two["tokens"]) == (one["blocks"], one["tokens"])
    assert_same_losses([two["loss"]], [one["loss"]], atol=1e-5 * one["loss"])  # fp32 sums in another order


def test_without_validation_data_or_adapter_it_is_one_line(run, tmp_path):
    r = lora_dist("eval", *run["common"], "data.eval_fraction=0", "parallel.strategy=none", check=False)
    assert r.returncode == 2 and "no validation data" in r.stderr and "Traceback" not in r.stderr
    r = lora_dist("eval", *run["common"], f"output.dir={tmp_path}", "parallel.strategy=none", check=False)
    assert r.returncode == 2 and "no adapter at" in r.stderr and "--base-only" in r.stderr


def test_an_adapter_of_another_base_is_named_as_one(run, tiny_checkpoint, tmp_path):
    """An adapter trained on another architecture: its targets match no layer of model.path. The error said so in
    the adapter's own terms ("lora.target_modules=... matched no linear layer"), a key the user never set."""
    from transformers import AutoModelForCausalLM

    from lora_dist import LoRAConfig, inject_lora, save_adapter

    other = tiny_checkpoint("gpt2")
    model = AutoModelForCausalLM.from_pretrained(other)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["c_attn"]))
    save_adapter(model, tmp_path / "adapter", str(other))
    r = lora_dist("eval", *run["common"], "parallel.strategy=none", "--adapter", str(tmp_path / "adapter"),
                  check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"the adapter at {tmp_path / 'adapter'} does not fit model.path={run['base']}" in last
    assert "trained on a different base: set model.path to that base" in last
