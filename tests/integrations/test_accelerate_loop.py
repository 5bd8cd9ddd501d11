"""examples/accelerate_loop.py: a plain Accelerator loop next to lora_dist's engine; accelerate never wraps the model."""

from __future__ import annotations

import sys

import pytest

from common import assert_same_adapter, python
from distutil import REPO, free_port, quiet_env

EXAMPLE = str(REPO / "examples" / "accelerate_loop.py")


@pytest.mark.dist
def test_one_process_equals_lora_dist_train(loop_setup):
    out = loop_setup["root"] / "accelerate-one"
    python(EXAMPLE, str(loop_setup["base"]), str(loop_setup["data"]), str(out), "none")
    assert_same_adapter(loop_setup["ref"] / "adapter", out / "adapter", atol=1e-6)


@pytest.mark.dist
def test_accelerate_launch_two_processes_equals_lora_dist_train(loop_setup):
    import subprocess

    out = loop_setup["root"] / "accelerate-two"
    # --multi_gpu is accelerate's torchrun launcher; on a CPU-only machine it starts CPU processes (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), EXAMPLE, str(loop_setup["base"]), str(loop_setup["data"]), str(out),
           "fsdp2"]
    proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("step 3 loss") == 1  # accelerator.print: the main process only
    assert_same_adapter(loop_setup["ref"] / "adapter", out / "adapter")


def test_accelerator_prepare_of_the_model_is_refused_in_one_line(tiny_checkpoint):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import LlamaForCausalLM

    import lora_dist
    from lora_dist.config import ConfigError
    from lora_dist.integrations.accelerate import REWRAP_MESSAGE
    from lora_dist.launch import destroy_distributed

    try:
        model, engine = lora_dist.prepare(tiny_checkpoint("llama"), lora_dist.LoRAConfig(r=4), strategy="none")
        accelerator = Accelerator(cpu=True)
        for prepare in (accelerator.prepare, accelerator.prepare_model):
            with pytest.raises(ConfigError) as refused:
                prepare(model)
            assert str(refused.value) == REWRAP_MESSAGE and "\n" not in REWRAP_MESSAGE
        # accelerate's FSDP2 (and tensor-parallel) path prepares the model without asking, then marks it so
        # (a GPU-only path: on the CPU accelerate never picks FSDP): the same one line, not "property ... has no
        # setter".
        with pytest.raises(ConfigError) as refused:
            model._is_accelerate_prepared = True
        assert str(refused.value) == REWRAP_MESSAGE
        assert accelerator._models == [] and engine.model is model and isinstance(model, LlamaForCausalLM)
        assert len(accelerator.prepare(DataLoader(list(range(4)), batch_size=2))) == 2  # dataloaders still prepare
    finally:
        destroy_distributed()


def test_prepare_under_an_accelerate_deepspeed_or_fsdp_config_warns_that_the_guard_cannot_apply(tiny_checkpoint,
                                                                                                 monkeypatch, caplog):
    """accelerate's DeepSpeed and FSDP plugins take the model without reading _is_accelerate_prepared first: there
    the refusal above comes late (FSDP2) or not at all (DeepSpeed), and prepare says so."""
    import lora_dist
    from lora_dist.launch import destroy_distributed

    def warned(flag: str | None) -> bool:
        for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
            monkeypatch.delenv(name, raising=False)
        if flag:
            monkeypatch.setenv(flag, "true")
        caplog.clear()
        try:
            with caplog.at_level("WARNING", logger="lora_dist"):
                lora_dist.prepare(tiny_checkpoint("llama"), lora_dist.LoRAConfig(r=4), strategy="none")
        finally:
            destroy_distributed()
        return "accelerator.prepare(model) would wrap lora_dist's model again" in caplog.text

    assert warned("ACCELERATE_USE_DEEPSPEED") and warned("ACCELERATE_USE_FSDP") and not warned(None)
