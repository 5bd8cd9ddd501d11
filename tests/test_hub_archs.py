"""More of the Hub's decoder families (:data:`lora_dist.demo.HUB_ARCHS`: Qwen3, Gemma 3, Phi-3, DeepSeek-V3,
gpt-oss, Qwen3-Next, Qwen2-MoE) and vision-language checkpoints fine-tuned on text (:data:`lora_dist.demo.VLM_ARCHS`:
Gemma 3, Qwen2.5-VL, Llama 4), saved like real checkpoints: ``all-linear`` LoRA trains on 2 FSDP2 or ZeRO-3 ranks to
the one-process result, and the merged export written from the FSDP2 shards is the base plus the adapter, as PEFT
applies it where PEFT reads it as trained. A vision-language model's LoRA stays in its language model, and its
export keeps every tensor and name of the checkpoint, the vision tower's untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distutil import adapter_atol, assert_same_run, lora_dist, ranks, short_run_args
from lora_dist.adapter import installed_peft_misreads, load_adapter, peft_misread, save_adapter
from lora_dist.demo import HUB_ARCHS, VLM_ARCHS, write_demo_data
from lora_dist.lora import LoRAConfig, inject_lora, lora_modules
from lora_dist.model_dir import ModelDir, model_class

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

STEPS = 3
LR = 5e-3


#: Where each vision-language checkpoint's language model is, as transformers builds it.
LANGUAGE_MODEL = {"gemma3": "model.language_model.", "qwen2_5_vl": "model.language_model.", "llama4": "language_model."}


def _hf_model(path: Path) -> torch.nn.Module:
    """The checkpoint as transformers loads it: its own class (a vision-language model whole)."""
    return model_class(ModelDir(path).hf_config).from_pretrained(path, dtype=torch.float32).eval()


def assert_peft_adapts_exactly(path: Path, adapter: Path, model: torch.nn.Module, adapted: list[str]) -> None:
    """PEFT, loading ``adapter`` onto the checkpoint at ``path``, adapts exactly the layers ``adapted`` and computes
    what ``model`` (lora_dist's, with the adapter) computes."""
    import peft

    reference = peft.PeftModel.from_pretrained(_hf_model(path), adapter).eval()
    peft_adapted = [n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(peft_adapted) == sorted(adapted)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=HUB_ARCHS + VLM_ARCHS)
def runs(request, tiny_checkpoint, tmp_path_factory):
    """The same 3 steps of r=4 LoRA on every linear layer but the head, in one process and on 2 FSDP2 ranks, each
    with a float32 merged export."""
    arch = request.param
    base = tiny_checkpoint(arch)
    root = tmp_path_factory.mktemp(f"hub-{arch}")
    data = write_demo_data(root / "data.jsonl", n=200)
    common = ["train", *short_run_args(base, data, STEPS, LR, "all-linear"), "export.merged=true",
              "export.dtype=float32"]
    lora_dist(*common, f"output.dir={root / 'one'}", "parallel.strategy=none", "train.micro_batch_size=4")
    launch = ranks(2, "-m", "lora_dist.cli", *common, f"output.dir={root / 'fsdp2'}", "parallel.strategy=fsdp2",
                   "train.micro_batch_size=2")
    ranks(2, "-m", "lora_dist.cli", *common, f"output.dir={root / 'zero3'}", "parallel.strategy=zero3",
          "train.micro_batch_size=2", "export.merged=false")
    return {"arch": arch, "base": base, "one": root / "one", "fsdp2": root / "fsdp2", "zero3": root / "zero3",
            "log": launch.stdout + launch.stderr}


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_two_ranks_train_every_linear_layer_to_the_one_process_result(runs, strategy):
    model = _hf_model(runs["base"])
    head = model.get_output_embeddings()
    # Linear projections (not Llama 4's router, a Linear subclass returning more than the projection); in a
    # vision-language model, those of its language model only.
    linear = {name for name, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}
    if runs["arch"] in VLM_ARCHS:
        text = {name for name in linear if name.startswith(LANGUAGE_MODEL[runs["arch"]])}
        assert text and linear - text  # a vision tower with linear layers of its own, left out
        linear = text
    adapter = load_file(str(runs[strategy] / "adapter" / "adapter_model.safetensors"))
    adapted = {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight") for k in adapter if "lora_B" in k}
    assert adapted == linear
    assert min(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 1e-4  # every adapter trained
    assert_same_run(runs[strategy], runs["one"], adapter_atol(LR, STEPS))


@pytest.mark.dist
def test_merged_export_from_the_shards_is_base_plus_adapter(runs):
    """The merged checkpoint computes what the base with the adapter computes: as lora_dist loads the adapter, and as
    PEFT does where PEFT reads it as trained (elsewhere the run said which layers PEFT misreads)."""
    import peft

    from lora_dist.export import verify_checkpoint

    run = runs["fsdp2"]
    base, merged = ModelDir(runs["base"]), ModelDir(run / "merged")
    assert set(merged.keys()) == set(base.keys())  # the checkpoint's own names (tied heads stay unsaved)
    assert all(merged.shape(k) == base.shape(k) for k in base.keys())
    report = verify_checkpoint(run / "merged", base_dir=runs["base"], adapter_dir=run / "adapter", sample=None)
    assert report.targeted > 0
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _hf_model(run / "merged")(input_ids=ids).logits
        unmerged = load_adapter(_hf_model(runs["base"]), run / "adapter")
        want = unmerged(input_ids=ids).logits
        effect = float((want - _hf_model(runs["base"])(input_ids=ids).logits).abs().max())
        assert effect > 1e-4  # the adapter changes the output, so the comparisons below can fail
        torch.testing.assert_close(got, want, atol=max(1e-5, 1e-3 * effect), rtol=0)
        misread = peft_misread(unmerged)
        if misread:
            said = f"PEFT 0.21 and earlier would load {len(misread)} of this adapter's layers wrongly ({misread[0]}"
            assert said in runs["log"]
        if not misread or not installed_peft_misreads():  # PEFT 0.22 and later read the misread layers as trained
            reference = peft.PeftModel.from_pretrained(_hf_model(runs["base"]), run / "adapter").eval()
            torch.testing.assert_close(reference(input_ids=ids).logits, want, atol=max(1e-5, 1e-3 * effect), rtol=0)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys:UserWarning")  # PEFT's, about the misread
@pytest.mark.parametrize("arch,misread", [("deepseek_v3", True), ("qwen3_next", True), ("qwen2_moe", False)])
def test_peft_misreads_the_expert_named_layers_the_warning_names(arch, misread, tiny_checkpoint, tmp_path):
    """PEFT 0.21 takes a shared expert's or a dense layer's ``gate_proj``/``up_proj``/``down_proj`` for the fused
    experts in models of transformers' Qwen2-MoE conversion pattern (DeepSeek-V3, Qwen3-Next), not in Qwen2-MoE
    itself. :func:`peft_misread` names exactly the layers PEFT 0.21 loads wrongly, and excluding them gives an
    adapter it reads as trained. PEFT 0.22 (the latest tier's) reads them as trained: the whole adapter loads as
    lora_dist's, which is why the warning is a note there (``installed_peft_misreads``)."""
    import peft

    path = tiny_checkpoint(arch)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))

    def adapted(**kwargs):
        model = _hf_model(path)
        inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", **kwargs))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in lora_modules(model):
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
        return model

    def peft_vs_ours(model, name):
        save_adapter(model, tmp_path / name)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
            theirs = peft.PeftModel.from_pretrained(_hf_model(path), tmp_path / name).eval()(input_ids=ids).logits
        return float((ours - theirs).abs().max())

    model = adapted()
    mlp = [n for n, _ in lora_modules(model) if n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    assert any("shared_expert" in n for n in mlp)  # every family here has a shared expert, adapted
    assert peft_misread(model) == (mlp if misread else [])
    if misread:
        if installed_peft_misreads():
            assert peft_vs_ours(model, "all") > 1e-3
        else:
            assert peft_vs_ours(model, "all") < 1e-5
        model = adapted(exclude_modules=["gate_proj", "up_proj", "down_proj"])
        assert not peft_misread(model)
    assert peft_vs_ours(model, "read") < 1e-5
    dense = _hf_model(tiny_checkpoint("llama"))  # a model without experts: its MLP names mean what they say
    inject_lora(dense, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert not peft_misread(dense)


@pytest.mark.filterwarnings("error:Found missing adapter keys:UserWarning")  # PEFT adapting more than was trained
@pytest.mark.parametrize("targets", ["all-linear", ["gate_proj", "up_proj", "down_proj"]], ids=["all-linear", "mlp"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "qwen3_next"])
def test_peft_adapts_no_routed_expert_the_adapter_did_not_train(arch, targets, tiny_checkpoint, tmp_path):
    """On a model with fused experts PEFT converts a target named like an expert projection (``gate_proj``,
    ``up_proj``, ``down_proj``) to the experts. The adapter's config names each adapted layer in full, so PEFT adapts
    a shared expert's or a dense layer's MLP and no routed expert besides: named by a regex, PEFT 0.22 added untrained
    LoRA to every routed expert ("missing adapter keys") and would train it on; named by leaf names (a list of them,
    which a dense model's adapter keeps), it did too. Where the installed PEFT reads the
    layers as trained (0.22; Qwen2-MoE on 0.21 too) it adapts exactly lora_dist's layers, with the same outputs;
    PEFT 0.21's misreading of DeepSeek-V3's and Qwen3-Next's is the test above's."""
    path = tiny_checkpoint(arch)
    model = _hf_model(path)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    adapted = [n for n, _ in lora_modules(model)]
    assert any("shared_expert" in n for n in adapted) and not any(".experts" in n for n in adapted)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == adapted and not config["target_parameters"]
    if peft_misread(model) and installed_peft_misreads():
        return  # PEFT 0.21 on DeepSeek-V3/Qwen3-Next: the misread the run warns about
    assert_peft_adapts_exactly(path, tmp_path / "adapter", model, adapted)


@pytest.mark.filterwarnings("error:Found missing adapter keys:UserWarning")  # PEFT adapting more than was trained
@pytest.mark.parametrize("arch", ["gemma3", "llama4"])
def test_a_name_list_on_a_vision_language_model_stays_in_its_language_model_in_peft_too(arch, tiny_checkpoint,
                                                                                         tmp_path):
    """The default ``[q_proj, v_proj]`` adapts the language model only; the vision tower has layers of those names
    too, and the adapter's config names exactly the adapted ones, so PEFT adapts what was trained and nothing more,
    with the same outputs."""
    path = tiny_checkpoint(arch)
    model = _hf_model(path)
    vision = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")
              and not n.startswith(LANGUAGE_MODEL[arch])]
    assert vision  # the tower's own q_proj/v_proj, which a leaf-name list would reach
    inject_lora(model, LoRAConfig(r=4, alpha=8))  # the model type's default targets
    adapted = [n for n, _ in lora_modules(model)]
    assert adapted and all(n.startswith(LANGUAGE_MODEL[arch]) for n in adapted)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    save_adapter(model, tmp_path / "adapter")
    assert_peft_adapts_exactly(path, tmp_path / "adapter", model, adapted)
