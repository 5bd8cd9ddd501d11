"""Distributed training on CPU/gloo equals single-process training, numerically.

Every strategy runs the same few steps on 2 ranks and must give the LoRA
weights that 1 process computes on the same global batch.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from distutil import (adapter_atol, assert_same_run, logged, lora_dist, ranks, short_run_args, short_run_setup,
                      train_run)
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.dist

STEPS = 3
LR = 5e-3
#: Ranks sum gradients in another order than one process (and another order on another CPU): 5e-5
#: (distutil.adapter_atol says why), met with distutil.assert_same_adapter's margin.
ADAPTER_ATOL = adapter_atol(LR, STEPS)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    return short_run_setup(tiny_checkpoint("llama", hidden=64, layers=2), tmp_path_factory.mktemp("train"), STEPS, LR)


def _train(setup, name: str, nproc: int, *overrides: str) -> Path:
    return train_run(setup["root"] / name, nproc, *setup["common"], *overrides)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(setup):
    """One process, global batch 4 (micro-batch 4)."""
    return _train(setup, "ref", 1, "parallel.strategy=none", "train.micro_batch_size=4")


def _assert_same_run(reference: Path, out: Path, atol: float = ADAPTER_ATOL) -> None:
    """``out`` trained as ``reference`` did: the same adapter, losses and gradient norms."""
    assert_same_run(out, reference, atol)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3", "ddp"])
def test_two_ranks_equal_one_process(setup, reference, strategy):
    out = setup["root"] / strategy
    proc = ranks(2, "-m", "lora_dist.cli", "train", *setup["common"], f"parallel.strategy={strategy}",
                 "train.micro_batch_size=2", f"output.dir={out}")
    _assert_same_run(reference, out)
    # What the user reads: the whole model's sizes (ZeRO-3 partitions each param as it is created), and no
    # deprecation of torch's collectives for calls in DeepSpeed (4 per rank and step before it was silenced).
    lora = sum(t.numel() for t in _adapter(out).values())
    with safe_open(str(setup["base"] / "model.safetensors"), "pt") as f:
        base = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert f"trainable params: {lora:,d} || all params: {base + lora:,d} ||" in proc.stderr
    assert not re.search(r"`torch\.distributed\.\w+` is deprecated", proc.stderr), proc.stderr[-2000:]


@pytest.mark.parametrize("strategy,variant", [
    ("fsdp2", "train.loss_chunk=7"),  # the loss on the head's vocabulary shards, 3 tokens of each rank a chunk
    ("fsdp2", "parallel.gather_head=true train.loss_chunk=7"),  # the head gathered, 7-token chunks recomputed
    ("fsdp2", "parallel.gather_embedding=true"),  # the embedding gathered (by default it looks up on its shards)
    ("zero3", "train.loss_chunk=7"),  # ... with ZeRO-3 gathering the head again for the recompute
    ("ddp", "train.loss_chunk=0 parallel.shard_optimizer=false"),  # full logits, DDP's all-reduce, whole AdamW
    ("fsdp2", "train.loss_chunk=0 parallel.shard_optimizer=false"),  # full logits, the bucketed all-reduce
])
def test_loss_and_optimizer_variants_equal_one_process(setup, reference, strategy, variant):
    """The reference runs the default loss (one chunk at these sizes) and one process's AdamW; 2 ranks run
    the head in many chunks, or the full logits with a whole AdamW state per rank instead of ZeRO-1 over
    the LoRA."""
    out = _train(setup, f"{strategy}-{'-'.join(variant.split())}", 2, f"parallel.strategy={strategy}",
                 "train.micro_batch_size=2", *variant.split())
    _assert_same_run(reference, out)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3", "ddp"])
def test_grad_accum_2x2_equals_batch_4(setup, reference, strategy):
    out = _train(setup, f"accum-{strategy}", 2, f"parallel.strategy={strategy}", "train.micro_batch_size=1",
                 "train.grad_accum=2")
    _assert_same_run(reference, out)


@pytest.fixture(scope="module")
def bf16_references(setup):
    """One process, global batch 4, in each bf16 mode: the base stored in bf16, or an fp32 base computed in bf16
    (FSDP2's cast: fsdp2 stays fsdp2 on one rank for it)."""
    return {"model.dtype=bfloat16": _train(setup, "ref-bf16-base", 1, "parallel.strategy=none",
                                           "train.micro_batch_size=4", "model.dtype=bfloat16"),
            "parallel.mixed_precision=bfloat16": _train(setup, "ref-bf16-compute", 1, "parallel.strategy=fsdp2",
                                                        "train.micro_batch_size=4",
                                                        "parallel.mixed_precision=bfloat16")}


def _assert_same_bf16_run(out: Path, reference: Path) -> None:
    """``out`` trained as the one-process ``reference`` did, in bf16. Elementwise the adapters cannot agree: any two
    bf16 pipelines (another kernel, reduction order or shard of the head) put each element's gradient a bf16 rounding
    apart, and Adam turns the sign of a near-zero one into a +-lr step; after 3 steps the LoRA tensors of two correct
    runs differ by up to 7.3% (relative Frobenius norm, measured between every pair of them, and between bf16 and fp32
    one-process runs). So: every tensor within 25%, the losses within 1e-3 (measured 1.8e-4) and the gradient norms
    within 2% (measured 0.33%): a gradient off by a constant factor still moves the norm by that factor."""
    from distutil import assert_same_grad_norms, assert_same_losses

    got, want = _adapter(out), _adapter(reference)
    assert set(got) == set(want) and want
    worst = max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)
    assert worst <= 0.25, f"a LoRA tensor {worst:.1%} off the one-process bf16 run's"
    assert max(float(t.abs().max()) for k, t in got.items() if "lora_B" in k) > 1e-4  # trained
    assert_same_losses(logged(out), logged(reference), atol=1e-3)
    assert_same_grad_norms(out, reference, rtol=2e-2)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3", "ddp"])
def test_bf16_stored_base_trains_fp32_lora(setup, reference, bf16_references, strategy):
    """model.dtype=bfloat16: the base is stored and computed in bf16 under every strategy (zero3 included: its
    DeepSpeed config turns bf16 on), the LoRA state stays fp32; 2 ranks train as 1 process does in bf16, and the
    losses follow the fp32 run's."""
    out = _train(setup, f"bf16-base-{strategy}", 2, f"parallel.strategy={strategy}", "train.micro_batch_size=2",
                 "model.dtype=bfloat16")
    assert all(t.dtype == torch.float32 for t in _adapter(out).values())
    _assert_same_bf16_run(out, bf16_references["model.dtype=bfloat16"])
    assert logged(out) == pytest.approx(logged(reference), rel=1e-3)
    assert logged(out) != pytest.approx(logged(reference), abs=1e-6)  # bf16 numbers, not the fp32 ones


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_bf16_base_compute_trains_fp32_lora(setup, reference, bf16_references, strategy):
    """parallel.mixed_precision=bfloat16: the fp32 base computes in bf16 (FSDP2's cast, DeepSpeed's bf16 mode), the
    LoRA state stays fp32; 2 ranks train as 1 process does in bf16, and the losses follow the fp32 run's."""
    out = _train(setup, f"bf16-{strategy}", 2, f"parallel.strategy={strategy}", "train.micro_batch_size=2",
                 "parallel.mixed_precision=bfloat16")
    assert all(t.dtype == torch.float32 for t in _adapter(out).values())
    _assert_same_bf16_run(out, bf16_references["parallel.mixed_precision=bfloat16"])
    assert logged(out) == pytest.approx(logged(reference), rel=1e-2)
    assert logged(out) != pytest.approx(logged(reference), abs=1e-6)  # bf16 numbers, not the fp32 ones


def test_loss_goes_down_on_demo_data(setup):
    out = _train(setup, "longer", 2, "parallel.strategy=fsdp2", "train.micro_batch_size=2", "train.steps=15",
                 "train.lr=1e-2", "lora.target_modules=all-linear")
    losses = logged(out)
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_base_is_sharded_without_grads_or_optimizer_state(setup, tmp_path, strategy):
    ranks(2, "tests/dist_scripts/inspect_sharding.py", str(tmp_path), f"model.path={setup['base']}",
          f"parallel.strategy={strategy}", "lora.r=4")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        expected_type = "zero3-partition" if strategy == "zero3" else "DTensor-Shard(0)"
        assert rep["base_types"] == [expected_type]
        assert rep["base_with_grad"] == [] and rep["base_requires_grad"] == []
        # The optimizer holds the LoRA params only, and its state (AdamW: two moments) is this rank's 1/W of
        # them: ZeRO-1 over the LoRA (fsdp2, parallel.shard_optimizer) or DeepSpeed's partition (zero3).
        assert rep["sharded_lora_optimizer"] == (strategy == "fsdp2")
        assert rep["optimizer_numel"] <= rep["lora_numel"] // 2 + 64, rep  # (+ padding to W)
        assert rep["lora_numel"] <= rep["optimizer_state_numel"] <= rep["lora_numel"] + 128, rep  # 2 moments of 1/W
        assert rep["lora_not_whole"] == []
        # Each rank holds about 1/W of the base bytes.
        share = rep["base_local_bytes"] / rep["base_full_bytes"]
        assert 0.45 <= share <= 0.55, share
        # ... and read only about that much from the checkpoint files (ZeRO-3: whole rows around its slice).
        assert 0.45 * rep["base_full_bytes"] <= rep["read_bytes"] <= 0.6 * rep["base_full_bytes"], rep
        assert rep["perturbed_detected"] and rep["perturbed_name"] in rep["perturbed_detected"]
        if strategy == "zero3":  # no reduce bucket bigger than all the LoRA gradients together
            assert rep["reduce_bucket_numel"] == rep["lora_numel"] < 25e6 / 4, rep
        # finish_training (before the end-of-training export) frees grads, Adam state, ZeRO-3's
        # reduce buckets, and leaves no non-persistent base weight gathered.
        assert rep["after_finish"]["lora_grads"] == rep["after_finish"]["optimizer_state_tensors"] == 0, rep
        assert rep["after_finish"]["reduce_buckets"] == 0
        if strategy == "zero3":
            assert rep["gathered_base_before_finish"] > 0 and rep["after_finish"]["gathered_base"] == 0, rep
    assert sum(r["base_local_bytes"] for r in reports) >= reports[0]["base_full_bytes"]


@pytest.mark.parametrize("every", ["true", "2"])  # every block; every 2nd (the first of the 2 blocks)
def test_activation_checkpointing_and_no_reshard_change_nothing(setup, reference, every):
    out = _train(setup, f"ac-{every}", 2, "parallel.strategy=fsdp2", "train.micro_batch_size=2",
                 f"parallel.activation_checkpointing={every}", "parallel.reshard_after_forward=false")
    _assert_same_run(reference, out)


@pytest.mark.parametrize("strategy,variant", [
    ("fsdp2", "parallel.shard_unit=weight"),  # each weight matrix its own FSDP2 unit
    ("zero3", ""),
])
def test_offloaded_activations_change_nothing(setup, reference, strategy, variant):
    """Checkpointed block inputs waiting in host memory (and, under fsdp2, one unit per weight) give 1 process's
    adapter."""
    out = _train(setup, f"offload-acts-{strategy}", 2, f"parallel.strategy={strategy}", "train.micro_batch_size=2",
                 "parallel.activation_checkpointing=true", "parallel.offload_activations=true", *variant.split())
    _assert_same_run(reference, out)


def test_cpu_offload_of_base_shards_changes_nothing(setup, reference):
    out = _train(setup, "offload", 2, "parallel.strategy=fsdp2", "train.micro_batch_size=2", "parallel.cpu_offload=true")
    _assert_same_run(reference, out)


@pytest.mark.parametrize("strategy", ["zero2", "zero1"])
def test_zero1_and_zero2_are_accepted_and_say_they_do_not_shard_the_base(setup, reference, strategy):
    out = setup["root"] / strategy
    proc = ranks(2, "-m", "lora_dist.cli", "train", *setup["common"], f"output.dir={out}",
                 f"parallel.strategy={strategy}", "train.micro_batch_size=2")
    assert "does not shard the frozen base" in proc.stderr
    # DeepSpeed's CPU accelerator compiles its shared-memory inference all-reduce at its first init (about 90 s,
    # once per install) and says so on every load; training never calls it (skip_cpu_inference_op)
    assert "shm_comm" not in proc.stdout + proc.stderr
    _assert_same_run(reference, out)


def test_zero2_bf16_keeps_the_lora_promise_fp32(setup):
    """Under bf16 ZeRO-1/2 DeepSpeed holds the LoRA params in bf16; the adapter comes from the fp32 masters,
    and the LoRA gradients are reduced in fp32."""
    from transformers import AutoConfig

    from lora_dist.config import load_config
    from lora_dist.parallel.deepspeed import deepspeed_config

    out = _train(setup, "zero2-bf16", 2, "parallel.strategy=zero2", "train.micro_batch_size=2",
                 "parallel.mixed_precision=bfloat16")
    adapter = _adapter(out)
    assert all(t.dtype == torch.float32 for t in adapter.values())
    trained_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert trained_b and all(t.abs().max() > 0 for t in trained_b)
    # bf16-rounded values would all survive a round trip through bf16; fp32 masters do not.
    assert all(not torch.equal(t, t.bfloat16().float()) for t in adapter.values())
    cfg = load_config(None, [*setup["common"], "parallel.strategy=zero2", "parallel.mixed_precision=bfloat16"])
    ds = deepspeed_config(cfg, AutoConfig.from_pretrained(setup["base"]))
    assert ds["communication_data_type"] == "fp32" and ds["bf16"]["enabled"] is True


def test_deepspeed_takes_the_exported_local_rank_whatever_open_mpi_says(setup, reference):
    """``mpirun`` with one GPU per rank (a wrapper setting CUDA_VISIBLE_DEVICES from the local rank):
    init_distributed exports LOCAL_RANK as the rank's device index, 0 on every rank, while Open MPI's
    OMPI_COMM_WORLD_LOCAL_RANK stays the rank's place on its node, and DeepSpeed's engine asserts that the two agree
    ("conflicting local rank info") on every rank but a node's first. A process whose exported LOCAL_RANK (0)
    differs from its Open MPI local rank (3) stands for such a rank here."""
    out = setup["root"] / "zero2-ompi"
    lora_dist("train", *setup["common"], "parallel.strategy=zero2", "train.micro_batch_size=4", f"output.dir={out}",
              OMPI_COMM_WORLD_LOCAL_RANK="3")
    _assert_same_run(reference, out)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_chat_data_two_ranks_equal_one_process(setup, tmp_path_factory, strategy):
    """Chat records (assistant-only loss masks, packed documents with their block-diagonal mask). The merged export
    renders chats with the template training used (data.chat_template): before, it kept the base's tokenizer files
    alone, so a base without a template exported a model with none, and one with its own served another."""
    root = tmp_path_factory.mktemp(f"chat-{strategy}")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": f"what does robot {i} build?"},
        {"role": "assistant", "content": f"robot {i} builds {i % 7} towers"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": f"it rests {i % 3} days"}]}) + "\n" for i in range(60)))
    chat = [f"data.path={data}", "data.chat_template=chatml", "train.seq_len=256"]
    ref = _train(setup, f"chat-ref-{strategy}", 1, *chat, "parallel.strategy=none", "train.micro_batch_size=4")
    out = _train(setup, f"chat-{strategy}", 2, *chat, f"parallel.strategy={strategy}", "train.micro_batch_size=2",
                 "export.merged=true")
    _assert_same_run(ref, out)
    from transformers import AutoTokenizer

    from lora_dist.chat import TEMPLATES

    def carries_the_runs_template(merged: Path) -> None:
        assert (merged / "chat_template.jinja").read_text() == TEMPLATES["chatml"]
        rendered = AutoTokenizer.from_pretrained(merged).apply_chat_template(
            [{"role": "user", "content": "what does robot 3 build?"}], tokenize=False, add_generation_prompt=True)
        assert rendered == "<|im_start|>user\nwhat does robot 3 build?<|im_end|>\n<|im_start|>assistant\n", merged

    carries_the_runs_template(out / "merged")
    assert (out / "adapter" / "chat_template.jinja").read_text() == TEMPLATES["chatml"]  # the adapter carries it
    if strategy == "fsdp2":  # lora-dist merge writes the adapter's; lora-dist export RUN_DIR the run's config's
        lora_dist("merge", "--base", str(setup["base"]), "--adapter", str(out / "adapter"), "--out",
                  str(root / "merged-offline"))
        carries_the_runs_template(root / "merged-offline")
        (out / "adapter" / "chat_template.jinja").unlink()  # an adapter written before adapters carried it
        lora_dist("export", str(out), "--out", str(root / "exported"))
        carries_the_runs_template(root / "exported")
        # An export carrying its template is one lora_dist wrote: --overwrite replaces it (it was refused as
        # holding a file lora_dist does not write). A run config naming a template that is gone: the export goes
        # on with the base's tokenizer files, saying so (it was a ChatError traceback).
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "data": {**config["data"],
                                                                        "chat_template": str(root / "gone.jinja")}}))
        proc = lora_dist("export", str(out), "--out", str(root / "exported"), "--overwrite")
        assert "the export carries the base's chat template, not the run's" in proc.stderr
        assert not (root / "exported" / "chat_template.jinja").exists()


def test_a_base_without_its_dropout_trains_alike_on_two_ranks(tiny_checkpoint, tmp_path):
    """GPT-2's config ships dropout 0.1, on in training as in PEFT and the Trainer (ranks draw other masks than one
    process then, and the log says so); ``model.base_dropout=false`` turns it off, and 2 ranks equal one process."""
    from lora_dist.demo import write_demo_data

    base = tiny_checkpoint("gpt2")
    common = short_run_args(base, write_demo_data(tmp_path / "data.jsonl", n=200), STEPS, LR, "[c_attn,c_fc]",
                            "model.base_dropout=false")
    ref = train_run(tmp_path / "ref", 1, *common, "parallel.strategy=none", "train.micro_batch_size=4")
    out = train_run(tmp_path / "fsdp2", 2, *common, "parallel.strategy=fsdp2", "train.micro_batch_size=2")
    assert_same_run(out, ref, ADAPTER_ATOL)
