"""examples/hf_trainer.py (LoraDistTrainer): W ranks == 1 process; PEFT loads the adapter; checkpoints resume."""

from __future__ import annotations

import ast
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from common import LORA, assert_same_adapter, peft_tensors, python, srun
from distutil import REPO, lora_dist, ranks
from lora_dist.config import ConfigError
from lora_dist.demo import write_demo_data

EXAMPLE = str(REPO / "examples" / "hf_trainer.py")
#: Four blocks and a global batch of four: every step sees the whole dataset, on any world size.
SAME_BATCH = ["--blocks", "4", "--global-batch", "4", "--steps", "3"]


def _logged(stdout: str, key: str) -> list[float]:
    """The values of ``key`` Trainer logged (rank 0 prints its log rows)."""
    rows = [ast.literal_eval(line[line.index("{"):]) for line in stdout.splitlines() if line.startswith(f"{{'{key}'")]
    return [float(r[key]) for r in rows]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    base = tiny_checkpoint("llama", hidden=64, layers=2)
    root = tmp_path_factory.mktemp("hf")
    data = write_demo_data(root / "data.jsonl", n=200)
    ref = root / "ref"
    proc = python(EXAMPLE, str(base), str(data), str(ref), "--strategy", "none", *SAME_BATCH, "--save-steps", "2",
                  "--merged-dtype", "float32", "--eval")
    return {"base": base, "data": data, "root": root, "ref": ref, "losses": _logged(proc.stdout, "loss"),
            "eval": _logged(proc.stdout, "eval_loss")}


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_two_ranks_equal_one_process(setup, strategy):
    out = setup["root"] / strategy
    proc = ranks(2, EXAMPLE, str(setup["base"]), str(setup["data"]), str(out), "--strategy", strategy, *SAME_BATCH,
                 "--eval")
    assert_same_adapter(setup["ref"] / "adapter", out / "adapter")
    # The logged loss is the global token mean: the same number on 2 ranks as in one process; so is the
    # eval loss over the same (full) blocks.
    # Trainer prints 4 significant digits.
    assert len(setup["losses"]) == 3 and _logged(proc.stdout, "loss") == pytest.approx(setup["losses"], abs=1.5e-3)
    assert len(setup["eval"]) == 1 and _logged(proc.stdout, "eval_loss") == pytest.approx(setup["eval"], abs=1.5e-3)
    assert (out / "merged" / "config.json").is_file()


@pytest.mark.dist
def test_srun_launch_equals_one_process(setup):
    """Under srun (no torchrun variables) TrainingArguments made after init_distributed see both tasks."""
    out = setup["root"] / "srun"
    srun(2, EXAMPLE, str(setup["base"]), str(setup["data"]), str(out), "--strategy", "fsdp2", *SAME_BATCH)
    assert_same_adapter(setup["ref"] / "adapter", out / "adapter")


@pytest.mark.dist
def test_adapter_loads_in_peft_and_merges_like_the_export(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = setup["ref"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32),
                                      str(ref / "adapter"))
    merged_by_peft = model.merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(ref / "merged", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32).state_dict()
    adapted = [k for k in ours if "q_proj.weight" in k or "down_proj.weight" in k]
    assert adapted and all(not torch.equal(ours[k], base[k]) for k in adapted)
    for key, value in ours.items():
        torch.testing.assert_close(merged_by_peft[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.dist
def test_trainer_checkpoint_is_safetensors_and_resumes_in_trainer_and_lora_dist_train(setup, tmp_path):
    ckpt = setup["ref"] / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"lora_dist", "scheduler.json", "trainer_state.json", "adapter_model.safetensors"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "training_args.bin", "pytorch_model.bin"}
    assert json.loads((ckpt / "lora_dist" / "state.json").read_text())["step"] == 2

    # Trainer resumes its own checkpoint: the third step lands where the uninterrupted run's did.
    resumed = tmp_path / "resumed"
    python(EXAMPLE, str(setup["base"]), str(setup["data"]), str(resumed), "--strategy", "none", *SAME_BATCH,
           "--resume", str(ckpt))
    assert_same_adapter(setup["ref"] / "adapter", resumed / "adapter", atol=1e-6)

    # `lora-dist train` resumes it too: at step 2 with its LoRA weights and AdamW moments, then trains on.
    common = [f"model.path={setup['base']}", f"data.path={setup['data']}", "train.seq_len=32", "data.eval_fraction=0",
              *LORA, "parallel.strategy=none", "train.micro_batch_size=4", f"checkpoint.resume={ckpt / 'lora_dist'}"]
    lora_dist("train", *common, "train.steps=2", f"output.dir={tmp_path / 'cli-2'}")
    saved = load_file(str(ckpt / "lora_dist" / "lora.safetensors"))
    restored = peft_tensors(tmp_path / "cli-2" / "adapter")
    assert set(saved) == set(restored) and all(torch.equal(saved[k], restored[k]) for k in saved)
    lora_dist("train", *common, "train.steps=3", f"output.dir={tmp_path / 'cli-3'}")
    steps = [json.loads(line)["step"] for line in (tmp_path / "cli-3" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]
    trained = peft_tensors(tmp_path / "cli-3" / "adapter")
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)

    # The reverse is refused in one line: Trainer needs its trainer_state.json, which `lora-dist train` does not write.
    refused = python(EXAMPLE, str(setup["base"]), str(setup["data"]), str(tmp_path / "reverse"), "--strategy", "none",
                     *SAME_BATCH, "--resume", str(ckpt / "lora_dist"), check=False)
    assert refused.returncode != 0 and "has no trainer_state.json" in refused.stderr
    # A checkpoint of save_only_model=True (no lora_dist/ state) is refused naming that, not as "unreadable".
    model_only = tmp_path / "model-only"
    shutil.copytree(ckpt, model_only)
    shutil.rmtree(model_only / "lora_dist")
    refused = python(EXAMPLE, str(setup["base"]), str(setup["data"]), str(tmp_path / "again"), "--strategy", "none",
                     *SAME_BATCH, "--resume", str(model_only), check=False)
    assert refused.returncode != 0 and "as a checkpoint of TrainingArguments(save_only_model=True) does" in \
        refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize(("change", "named"), [
    ({"deepspeed": "ds.json"}, "deepspeed"), ({"fsdp": "full_shard"}, "fsdp"), ({"bf16": True}, "bf16"),
    ({"activation_checkpointing": True}, r"activation_checkpointing=True\) conflicts"),
    ({"optim": "sgd"}, "optim=sgd"),
    # torchao's 4-/8-bit AdamW names start as torch's does: they trained as fp32 AdamW without a word
    ({"optim": "adamw_torch_4bit"}, "optim=adamw_torch_4bit"),
    ({"optim": "adamw_torch_8bit"}, "optim=adamw_torch_8bit"),
    ({"optim_args": "block_size=256"}, r"optim_args='block_size=256'\) is not applied"),
    ({"torch_compile": True}, r"torch_compile=True\) conflicts .*ParallelConfig\(compile=True\)"),
    # the Trainer would cast the model, fp32 LoRA too, to bf16 for good at the first evaluation
    ({"bf16_full_eval": True}, r"bf16_full_eval/fp16_full_eval=True\) conflicts"),
    ({"fp16_full_eval": True}, r"bf16_full_eval/fp16_full_eval=True\) conflicts"),
    # after the whole run, the Trainer looked for a pickled pytorch_model.bin
    ({"load_best_model_at_end": True}, r"load_best_model_at_end=True\) is not supported"),
    # arguments the engine's step would ignore without a word
    ({"label_smoothing_factor": 0.1}, r"label_smoothing_factor=...\) is not applied"),
    ({"activation_offloading": True}, r"activation_offloading=True\) is not applied .*offload_activations=True"),
])
def test_conflicting_training_arguments_are_refused_in_one_line(change, named):
    from transformers import TrainingArguments

    from lora_dist.integrations.hf import _check_args

    args = SimpleNamespace(**{**vars(TrainingArguments(output_dir="unused", report_to=[])), **change})
    with pytest.raises(ConfigError, match=named) as refused:
        _check_args(args)
    assert "\n" not in str(refused.value)


def test_a_peft_config_is_refused_before_any_work():
    """TRL's SFTTrainer(peft_config=...) wrapped lora_dist's model with PEFT's own adapters, which nothing stepped,
    and froze lora_dist's: every step's grad_norm was 0 and the saved adapter a no-op."""
    from transformers import TrainingArguments

    from lora_dist.integrations.hf import LoraDistTrainer

    args = TrainingArguments(output_dir="unused", report_to=[])
    with pytest.raises(ConfigError, match=r"drop peft_config= .*lora=LoRAConfig") as refused:
        LoraDistTrainer("no-model-is-read", args, peft_config=object())
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("strategy", "batches", "refused"), [("zero3", 6, True), ("zero2", 6, True),
                                                            ("zero3", 8, False), ("fsdp2", 6, False)])
def test_zero_refuses_an_epoch_that_does_not_end_on_an_optimizer_step(strategy, batches, refused):
    """Trainer's last step of an epoch of 6 micro-batches under gradient_accumulation_steps=4 has 2: DeepSpeed counts
    micro-steps, skipped that update and added its gradients into the next (a review reproduced it under zero3)."""
    from lora_dist.config import load_config
    from lora_dist.integrations.hf import LoraDistMixin

    class Base:
        def get_train_dataloader(self):
            return list(range(batches))

    class Trainer(LoraDistMixin, Base):
        pass

    trainer = object.__new__(Trainer)  # the check alone: no model, no DeepSpeed engine
    trainer.args = SimpleNamespace(gradient_accumulation_steps=4)
    trainer.lora_dist_config = load_config(None, [f"parallel.strategy={strategy}"])
    if refused:
        with pytest.raises(ConfigError, match=f"{batches} micro-batches per rank must be a multiple of "
                                              "gradient_accumulation_steps=4") as e:
            trainer.get_train_dataloader()
        assert "\n" not in str(e.value)
    else:
        assert len(trainer.get_train_dataloader()) == batches


def test_activation_checkpointing_is_read_by_its_current_name():
    """gradient_checkpointing, the deprecated alias, refuses as activation_checkpointing does (TrainingArguments copies
    it over when it is made); a user who then turns activation_checkpointing off, which is all the Trainer reads, is
    not refused for the stale alias (TRL's SFTConfig sets the alias on by default)."""
    import warnings

    from transformers import TrainingArguments

    from lora_dist.integrations.hf import _check_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the alias's deprecation
        args = TrainingArguments(output_dir="unused", report_to=[], gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=r"activation_checkpointing=True\) conflicts"):
        _check_args(args)
    args.activation_checkpointing = False
    assert args.gradient_checkpointing
    _check_args(args)


def _adapter(directory, r: int):
    from lora_dist.adapter import write_adapter

    tensors = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((r, 8), float(r)),
               "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, r)}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    return write_adapter(directory, tensors, config)


def test_a_save_cut_short_never_leaves_a_config_next_to_weights_it_does_not_describe(tmp_path, monkeypatch):
    """Trainer's output dir holds other files, so the adapter's two files are moved in one by one (rank 0's
    ``_save``): killed between the moves, the dir holds the new weights and no config, which is refused."""
    import os

    from lora_dist.adapter import ADAPTER_CONFIG, AdapterError, read_adapter
    from lora_dist.integrations.hf import _move_adapter_files

    out = tmp_path / "out"
    _adapter(out, r=2)
    (out / "trainer_state.json").write_text("{}")
    staged = _adapter(out / ".lora_dist-adapter", r=4)
    real = os.replace

    def killed_before_the_config(src, dst):
        if str(dst).endswith(ADAPTER_CONFIG):
            raise KeyboardInterrupt  # stands for the kill
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        _move_adapter_files(staged, out)
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        read_adapter(out)

    monkeypatch.setattr(os, "replace", real)
    staged = _adapter(out / ".lora_dist-adapter", r=4)
    _move_adapter_files(staged, out)
    adapter = read_adapter(out)
    assert adapter.config["r"] == 4 and {tuple(t.shape) for t in adapter.tensors.values()} == {(4, 8), (8, 4)}
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "trainer_state.json"]
