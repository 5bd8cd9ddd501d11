"""Mixture-of-experts checkpoints: read per rank from the Hub's per-expert tensors, trained, exported as stored.

transformers 5 fuses experts in memory (``mlp.experts.gate_up_proj`` (E, 2I, H),
``mlp.experts.down_proj`` (E, H, I)); the files keep one tensor per expert and
projection. The loader reads each fused param through transformers' own
conversion mapping (:mod:`lora_dist.weight_mapping`), a flat range at a time.
LoRA on the experts (``lora.target_parameters``) is checked against PEFT 0.21's
``target_parameters`` (its ``ParamWrapper``): forward, gradients, training, the
adapter files and ``merge_and_unload``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distutil import assert_same_run, lora_dist, randomize_lora_B, ranks
from lora_dist.demo import MOE_EXPERTS, write_demo_data
from lora_dist.model_dir import ModelDir
from lora_dist.weight_mapping import FileTensor, WeightMap, WeightMappingError, model_transforms

ARCHS = ["mixtral", "qwen3_moe"]
#: The fused expert params of one layer, as transformers holds them.
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
#: lora.target_parameters adapting both.
TARGET_PARAMETERS = list(FUSED)
#: Where the experts of layer 0 are in each checkpoint.
EXPERT_KEYS = {"mixtral": "model.layers.0.block_sparse_moe.experts.", "qwen3_moe": "model.layers.0.mlp.experts."}

STEPS = 3
LR = 5e-3
#: As in test_train_dist.py: 1/300 of the distance Adam can move an element in STEPS steps.
ADAPTER_ATOL = LR * STEPS / 300


def _hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _meta_model(path: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def _weight_map(path: Path, base: ModelDir | None = None) -> WeightMap:
    return WeightMap.of(base or ModelDir(path), _meta_model(path))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


class _RecordingDir(ModelDir):
    """A model dir that records every read: ``(key, first_row, end_row)``, rows None for the whole tensor."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.reads: list[tuple[str, int | None, int | None]] = []

    def read(self, key, rows=None):
        self.reads.append((key, None if rows is None else rows.start, None if rows is None else rows.stop))
        return super().read(key, rows)


# ----------------------------------------------------------------------------- loading, one process


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_has_the_hub_layout_and_transformers_fuses_it(tiny_checkpoint, arch):
    base = ModelDir(tiny_checkpoint(arch))
    expert_keys = [k for k in base.keys() if k.startswith(EXPERT_KEYS[arch])]
    assert len(expert_keys) == 3 * MOE_EXPERTS  # per expert: gate, up, down
    assert not any("gate_up_proj" in k for k in base.keys())
    names = dict(_meta_model(tiny_checkpoint(arch)).named_parameters())
    assert names["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == MOE_EXPERTS


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_equals_transformers(tiny_checkpoint, arch):
    from lora_dist.config import ModelConfig, ParallelConfig
    from lora_dist.lora import LoRAConfig, lora_modules
    from lora_dist.model import load_model

    path = tiny_checkpoint(arch)
    loaded = load_model(ModelConfig(path=str(path), dtype="float32"), LoRAConfig(target_modules=["q_proj", "v_proj"]),
                        ParallelConfig(strategy="none"), torch.device("cpu"), seed=0)
    model = loaded.model.eval()
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)} == {"q_proj", "v_proj"}
    assert all(float(m.lora_B.weight.detach().abs().max()) == 0 for _, m in lora_modules(model))  # B = 0: the base model
    ref = _hf_model(path)
    ours = dict(model.named_parameters())
    for name, param in ref.named_parameters():
        assert torch.equal(ours[name], param), name
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_a_missing_expert_is_a_shape_error(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from lora_dist.config import ModelConfig, ParallelConfig
    from lora_dist.lora import LoRAConfig
    from lora_dist.model import load_model
    from lora_dist.model_dir import ModelDirError

    path = tiny_checkpoint("mixtral")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    gone = f"{EXPERT_KEYS['mixtral']}{MOE_EXPERTS - 1}."
    save_file({k: v for k, v in tensors.items() if not k.startswith(gone)}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match=r"gate_up_proj .*checkpoint shape \(3, .* != model shape \(4, "):
        load_model(ModelConfig(path=str(broken), dtype="float32"), LoRAConfig(target_modules=["q_proj"]),
                   ParallelConfig(strategy="none"), torch.device("cpu"), seed=0)


# ----------------------------------------------------------------------------- read_flat


def _ranges(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Ranges that cut experts and rows anywhere, FSDP2 ``Shard(0)`` blocks (experts) and ZeRO-3 partitions."""
    numel, experts, expert, row = math.prod(shape), shape[0], math.prod(shape[1:]), shape[-1]
    out = [(0, 0), (0, numel), (0, 1), (numel - 1, numel), (expert, 2 * expert), (expert - 1, expert + 1),
           (row + 3, 3 * expert + 5), (expert + row // 2, expert + row // 2 + 7)]
    for world in (2, 3, 5, 7):
        part = -(-numel // world)
        out += [(min(r * part, numel), min((r + 1) * part, numel)) for r in range(world)]
        size = -(-experts // world)
        out += [(min(r * size, experts) * expert, min((r + 1) * size, experts) * expert) for r in range(world)]
    rng = random.Random(0)
    for _ in range(40):
        a, b = sorted(rng.randrange(numel + 1) for _ in range(2))
        out.append((a, b))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_read_flat_equals_the_fused_tensor_transformers_builds(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    weights = _weight_map(path)
    ref = dict(_hf_model(path).named_parameters())
    for layer in (0, 1):
        for suffix in FUSED:
            name = f"model.layers.{layer}.{suffix}"
            source = weights.source(name)
            fused = ref[name].detach()
            assert source.shape == tuple(fused.shape)
            assert len(source.keys()) == MOE_EXPERTS * (2 if "gate_up" in name else 1)
            torch.testing.assert_close(source.read(), fused, atol=0, rtol=0)
            flat = fused.reshape(-1)
            for a, b in _ranges(tuple(fused.shape)):
                got = source.read_flat(a, b)
                assert torch.equal(got, flat[a:b]), (name, a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_read_flat_reads_only_the_rows_it_returns(tiny_checkpoint, arch):
    """A range reads only its own experts' tensors, and of those only the rows that hold its elements."""
    path = tiny_checkpoint(arch)
    base = _RecordingDir(path)
    weights = _weight_map(path, base)
    source = weights.source("model.layers.0.mlp.experts.gate_up_proj")
    _, two_i, H = source.shape
    expert = two_i * H
    cases = [
        (expert, 2 * expert, {1}),  # expert 1, whole (an FSDP2 row block)
        (expert + 5, expert + H * (two_i // 2) + 3, {1}),  # inside expert 1, gate rows + one up row
        (2 * expert - 7, 2 * expert + 9, {1, 2}),  # a ZeRO-3 cut across experts 1 and 2
    ]
    for a, b, experts in cases:
        base.reads.clear()
        source.read_flat(a, b)
        read_experts = {int(k[len(EXPERT_KEYS[arch]):].split(".")[0]) for k, _, _ in base.reads}
        assert read_experts == experts, (a, b, base.reads)
        assert all(start is not None for _, start, _ in base.reads), "a whole tensor was read"
        rows_read = sum(stop - start for _, start, stop in base.reads)
        # Every row read holds an element of the range: at most one partial row at each end of each tensor.
        assert rows_read * H <= (b - a) + 2 * H * len(base.reads), (a, b, base.reads)


def test_unsupported_operation_is_refused_in_one_line(tiny_checkpoint):
    from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter, WeightRenaming

    path = tiny_checkpoint("mixtral")
    transforms = [
        WeightRenaming(".block_sparse_moe.", ".mlp."),
        WeightConverter([".experts.*.w1.weight", ".experts.*.w3.weight"], ".experts.gate_up_proj",
                        operations=[MergeModulelist(dim=0), Transpose(1, 2)]),
    ]
    weights = WeightMap(ModelDir(path), transforms, "model")
    assert weights.source("model.layers.0.mlp.gate.weight").keys() == ["model.layers.0.block_sparse_moe.gate.weight"]
    with pytest.raises(WeightMappingError) as e:
        weights.source("model.layers.0.mlp.experts.gate_up_proj")
    message = str(e.value)
    assert "\n" not in message and "Transpose" in message and "gate_up_proj" in message
    assert "MergeModulelist and Concatenate only" in message


def test_dense_models_read_their_tensors_as_stored(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    weights = _weight_map(path)
    for name, _ in _meta_model(path).named_parameters():
        assert weights.source(name).keys() == [name]


def test_planner_handles_moe(tiny_checkpoint):
    from lora_dist.config import load_config
    from lora_dist.plan import plan_memory

    path = tiny_checkpoint("mixtral")
    numel = sum(p.numel() for p in _meta_model(path).parameters())
    for strategy in ("fsdp2", "zero3"):
        cfg = load_config(None, [f"model.path={path}", f"parallel.strategy={strategy}",
                                 "lora.target_modules=[q_proj,v_proj]"])
        plan = plan_memory(cfg, 2)
        assert plan.num_params - plan.num_lora_params == numel and plan.total > 0


# ----------------------------------------------------------------------------- LoRA on the experts, against PEFT


def _expert_lora_model(path: Path, r: int = 4, **kwargs) -> torch.nn.Module:
    from lora_dist.lora import LoRAConfig, inject_lora

    model = _hf_model(path)
    inject_lora(model, LoRAConfig(r=r, alpha=2.0 * r, target_modules=["q_proj"], target_parameters=TARGET_PARAMETERS,
                                  **kwargs))
    return model


def _peft_twin(path: Path, ours: torch.nn.Module, r: int = 4) -> torch.nn.Module:
    """PEFT's LoRA with the same targets on a fresh copy, our A/B copied in by PEFT's names."""
    import peft

    from lora_dist.adapter import peft_names
    from lora_dist.lora import lora_modules

    twin = peft.get_peft_model(_hf_model(path), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj"], target_parameters=TARGET_PARAMETERS))
    params = dict(twin.named_parameters())
    names = peft_names(ours)
    with torch.no_grad():
        for name, layer in lora_modules(ours):
            for part in ("lora_A", "lora_B"):
                params[f"base_model.model.{names[name]}.{part}.default.weight"].copy_(getattr(layer, part).weight)
    return twin


def _randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    from lora_dist.lora import lora_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_has_peft_shapes_and_init(tiny_checkpoint, arch):
    import peft

    from lora_dist.lora import LoRAParam, lora_modules

    path = tiny_checkpoint(arch)
    ours = _expert_lora_model(path)
    twin = peft.get_peft_model(_hf_model(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                 target_parameters=TARGET_PARAMETERS))
    theirs = {k.replace(".default", ""): v for k, v in twin.named_parameters() if "lora_" in k}
    from lora_dist.adapter import peft_names

    names = peft_names(ours)
    experts = [(n, m) for n, m in lora_modules(ours) if isinstance(m, LoRAParam)]
    assert len(experts) == 4  # 2 layers x (gate_up_proj, down_proj)
    for name, layer in lora_modules(ours):
        for part in ("lora_A", "lora_B"):
            ref = theirs[f"base_model.model.{names[name]}.{part}.weight"]
            assert getattr(layer, part).weight.shape == ref.shape, (name, part)
        # A: kaiming-uniform(a=sqrt(5)) over in_features, as PEFT; B: zero
        bound = 1 / math.sqrt(layer.in_features)
        a = layer.lora_A.weight.detach()
        assert 0 < float(a.abs().max()) <= bound and float(a.abs().max()) > 0.8 * bound
        ref_a = theirs[f"base_model.model.{names[name]}.lora_A.weight"].detach()
        assert float(ref_a.abs().max()) <= bound
        assert float(layer.lora_B.weight.detach().abs().max()) == 0
    # The base names are kept: the fused params are where transformers put them.
    params = dict(ours.named_parameters())
    assert params["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == MOE_EXPERTS
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, _hf_model(path)(input_ids=ids).logits)  # B = 0: the base


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_forward_and_gradients_equal_peft(tiny_checkpoint, arch):
    from lora_dist.adapter import peft_names
    from lora_dist.lora import lora_modules

    path = tiny_checkpoint(arch)
    ours = _expert_lora_model(path)
    _randomize_b(ours)
    twin = _peft_twin(path, ours)
    ids = _ids(ours.config.vocab_size)
    out, ref = ours(input_ids=ids, labels=ids), twin(input_ids=ids, labels=ids)
    assert (out.logits - _hf_model(path)(input_ids=ids).logits).abs().max() > 1e-3  # the experts' LoRA acts
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    out.loss.backward()
    ref.loss.backward()
    theirs = dict(twin.named_parameters())
    names = peft_names(ours)
    for name, layer in lora_modules(ours):
        for part in ("lora_A", "lora_B"):
            grad = getattr(layer, part).weight.grad
            ref_grad = theirs[f"base_model.model.{names[name]}.{part}.default.weight"].grad
            assert float(grad.abs().max()) > 0, (name, part)
            torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}.{part}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_trains_like_peft(tiny_checkpoint, arch):
    """Three AdamW steps from the same initial A (B = 0) give the same adapter as PEFT's."""
    from lora_dist.adapter import peft_names
    from lora_dist.lora import lora_modules, lora_parameters

    path = tiny_checkpoint(arch)
    ours = _expert_lora_model(path).train()
    twin = _peft_twin(path, ours).train()
    mine = torch.optim.AdamW(lora_parameters(ours), lr=LR)
    theirs_params = [p for n, p in twin.named_parameters() if p.requires_grad]
    assert len(theirs_params) == len(lora_parameters(ours))
    theirs_opt = torch.optim.AdamW(theirs_params, lr=LR)
    for step in range(STEPS):
        ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, mine), (twin, theirs_opt)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    theirs = dict(twin.named_parameters())
    names = peft_names(ours)
    for name, layer in lora_modules(ours):
        b = layer.lora_B.weight.detach()
        assert float(b.abs().max()) > 1e-4  # it trained
        # fp32 rounding only: the attention's adapted layers sum base and update inside one matmul (PEFT: after),
        # and AdamW's first steps (update ~ lr * sign) magnify a last-bit difference of a near-zero gradient.
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, part).weight,
                                       theirs[f"base_model.model.{names[name]}.{part}.default.weight"],
                                       atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}.{part}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_adapter_loads_in_peft_and_merges_like_merge_and_unload(tiny_checkpoint, tmp_path, arch):
    """Our adapter files load in PEFT; the offline merge and the 1-process export equal PEFT's merge_and_unload."""
    import peft

    from lora_dist.adapter import load_adapter, save_adapter
    from lora_dist.export import export_merged, merge_offline, verify_checkpoint

    path = tiny_checkpoint(arch)
    ours = _expert_lora_model(path).eval()
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == TARGET_PARAMETERS
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # PEFT nests one ParamWrapper per parameter: gate_up_proj (registered first) is the inner one.
    assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"].shape[0] == 2 * keys[
        "base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape[1]
    twin = peft.PeftModel.from_pretrained(_hf_model(path), tmp_path / "adapter").eval()
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        torch.testing.assert_close(twin(input_ids=ids).logits, logits, atol=1e-6, rtol=0)
        again = load_adapter(_hf_model(path), tmp_path / "adapter").eval()
        torch.testing.assert_close(again(input_ids=ids).logits, logits, atol=0, rtol=0)
        reference = twin.merge_and_unload()
    ref_state = reference.state_dict()
    merge_offline(path, tmp_path / "adapter", tmp_path / "offline")
    export_merged(ours, tmp_path / "export", path, dtype=torch.float32)
    for out in ("offline", "export"):
        verify_checkpoint(tmp_path / out, base_dir=path, adapter_dir=tmp_path / "adapter", sample=None)
        merged = _hf_model(tmp_path / out)
        state = merged.state_dict()
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{out} {key}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5,
                                       rtol=0)
    offline, export = ModelDir(tmp_path / "offline"), ModelDir(tmp_path / "export")
    base = ModelDir(path)
    changed = [k for k in offline.keys() if ".experts." in k and not torch.equal(offline.read(k), base.read(k))]
    assert len(changed) == 2 * 3 * MOE_EXPERTS  # every expert's gate, up and down, in both layers
    assert all(torch.equal(offline.read(k), export.read(k)) for k in offline.keys())  # the same merge, bit for bit


def test_merge_in_place_equals_peft_and_unmerges(tiny_checkpoint):
    from lora_dist.lora import disable_adapters, lora_modules

    path = tiny_checkpoint("mixtral")
    ours = _expert_lora_model(path).eval()
    _randomize_b(ours)
    twin = _peft_twin(path, ours)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        for _, layer in lora_modules(ours):
            layer.merge()
        torch.testing.assert_close(ours(input_ids=ids).logits, before, atol=1e-5, rtol=0)
        reference = twin.merge_and_unload().state_dict()
        state = ours.state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")
        with disable_adapters(ours):
            torch.testing.assert_close(ours(input_ids=ids).logits, _hf_model(path)(input_ids=ids).logits,
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(target_parameters=["mlp.experts.up_proj"]),
     r"matched no parameter; the model's 3-D \(expert\) parameters are \['mlp.experts.down_proj', "
     r"'mlp.experts.gate_up_proj'\]"),
    (dict(target_parameters=TARGET_PARAMETERS, dropout=0.1), r"lora.dropout=0.1 cannot apply to lora.target_param"),
    (dict(target_parameters="mlp.experts.gate_up_proj"), r"lora.target_parameters must be a non-empty list"),
    (dict(target_parameters=["self_attn.q_proj.weight"], target_modules=["q_proj"]),
     r"q_proj.weight, a weight of a layer lora.target_modules already adapts"),
])
def test_bad_target_parameters_are_one_line_errors(tiny_checkpoint, kwargs, match):
    from lora_dist.lora import LoRAConfig, LoRAConfigError, inject_lora

    model = _hf_model(tiny_checkpoint("qwen3_moe"))
    with pytest.raises(LoRAConfigError, match=match) as e:
        inject_lora(model, LoRAConfig(**kwargs))
    assert "\n" not in str(e.value)


def test_target_parameters_alone_adapt_only_the_experts(tiny_checkpoint):
    from lora_dist.lora import LoRAConfig, inject_lora

    model = _hf_model(tiny_checkpoint("mixtral"))
    report = inject_lora(model, LoRAConfig(target_parameters=["mlp.experts.down_proj"]))
    assert report.matched == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".experts.lora.down_proj.lora_" in n for n in trainable)


# ----------------------------------------------------------------------------- 2 ranks: reads, training, export

_READS_SCRIPT = """
import json, sys
import torch
from lora_dist.config import load_config
from lora_dist.launch import init_distributed
from lora_dist.model import load_model
from lora_dist.model_dir import ModelDir
from lora_dist.parallel.deepspeed import deepspeed_config

out, *overrides = sys.argv[1:]
env = init_distributed()
cfg = load_config(None, overrides)
reads = []
_read = ModelDir.read
def recorded(self, key, rows=None):
    reads.append([key, None if rows is None else rows.start, None if rows is None else rows.stop])
    return _read(self, key, rows)
ModelDir.read = recorded
base = ModelDir(cfg.model.path)
ds = deepspeed_config(cfg, base.hf_config) if cfg.parallel.strategy.startswith("zero") else None
load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0, ds, base=base)
with open(f"{out}/rank{env.rank}.json", "w") as f:
    json.dump(reads, f)
"""


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_each_rank_reads_only_its_own_experts(tiny_checkpoint, tmp_path, strategy):
    path = tiny_checkpoint("mixtral")
    script = tmp_path / "reads.py"
    script.write_text(_READS_SCRIPT)
    ranks(2, str(script), str(tmp_path), f"model.path={path}", f"parallel.strategy={strategy}",
          "lora.target_modules=[q_proj,v_proj]")
    prefix = EXPERT_KEYS["mixtral"]
    half = MOE_EXPERTS // 2
    for rank in range(2):
        reads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        experts = {int(k[len(prefix):].split(".")[0]) for k, _, _ in reads if k.startswith(prefix)}
        # gate_up_proj and down_proj are (E, ...) with E = 4: rows (fsdp2) and partitions (zero3) are 2 experts.
        assert experts == set(range(rank * half, (rank + 1) * half)), (rank, sorted(experts))


@pytest.fixture(scope="module", params=ARCHS)
def runs(request, tiny_checkpoint, tmp_path_factory):
    """One process, fsdp2 and zero3 on 2 ranks: the same 3 steps with LoRA on the attention and on every
    expert (``lora.target_parameters``), each with a float32 merged export."""
    arch = request.param
    base = tiny_checkpoint(arch)
    root = tmp_path_factory.mktemp(f"moe-{arch}")
    data = write_demo_data(root / "data.jsonl", n=200)
    common = ["train", f"model.path={base}", f"data.path={data}", f"train.steps={STEPS}", "train.seq_len=32",
              f"train.lr={LR}", "train.warmup_steps=1", "data.eval_fraction=0", "lora.r=4",
              "lora.target_modules=[q_proj,v_proj]", f"lora.target_parameters=[{','.join(TARGET_PARAMETERS)}]",
              "checkpoint.every=0", "export.merged=true", "export.dtype=float32"]
    out = {"base": base}
    lora_dist(*common, f"output.dir={root / 'none'}", "parallel.strategy=none", "train.micro_batch_size=4")
    out["none"] = root / "none"
    for strategy in ("fsdp2", "zero3"):
        ranks(2, "-m", "lora_dist.cli", *common, f"output.dir={root / strategy}", f"parallel.strategy={strategy}",
              "train.micro_batch_size=2")
        out[strategy] = root / strategy
    return out


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_two_ranks_equal_one_process(runs, strategy):
    ref, out = _adapter(runs["none"]), _adapter(runs[strategy])
    assert set(ref) == set(out) and ref
    # PEFT's names: gate_up_proj's wrapper nests inside down_proj's
    assert {k.removeprefix("base_model.model.model.layers.0.mlp.experts.") for k in ref if ".experts." in k
            and ".layers.0." in k} == {"base_layer.lora_A.weight", "base_layer.lora_B.weight", "lora_A.weight",
                                       "lora_B.weight"}
    assert min(float(t.abs().max()) for k, t in ref.items() if "lora_B" in k) > 1e-4  # every adapter trained
    # measured: losses 8.2e-7 apart at most, gradient norms 2e-7 (relative): the defaults' bounds, with room
    assert_same_run(runs[strategy], runs["none"], ADAPTER_ATOL)


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["none", "fsdp2", "zero3"])
def test_merged_export_keeps_the_checkpoint_layout_and_equals_peft_merge(runs, strategy):
    """Each rank merged its own experts' rows of the fused params; the files are the Hub's per-expert tensors,
    and equal PEFT's ``merge_and_unload`` of the run's adapter, tensor by tensor and in logits."""
    import peft

    from lora_dist.export import verify_checkpoint

    base, run = ModelDir(runs["base"]), runs[strategy]
    merged = ModelDir(run / "merged")
    assert set(merged.keys()) == set(base.keys())
    assert all(merged.shape(k) == base.shape(k) for k in base.keys())
    report = verify_checkpoint(run / "merged", base_dir=runs["base"], adapter_dir=run / "adapter", sample=None)
    assert report.targeted == 2 * (2 + 3 * MOE_EXPERTS)  # per layer: q, v, and every expert's 3 tensors
    with torch.no_grad():
        model = _hf_model(run / "merged")
        reference = peft.PeftModel.from_pretrained(_hf_model(runs["base"]), run / "adapter").merge_and_unload()
        ref_state, state = reference.state_dict(), model.state_dict()
        assert set(ref_state) == set(state)
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")
        ids = _ids(model.config.vocab_size)
        diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_offline_merge_of_the_adapter_equals_the_sharded_export(runs, strategy, tmp_path):
    """``lora-dist merge`` (base files + adapter) gives the bytes the ranks merged from their shards."""
    out = tmp_path / "offline"
    lora_dist("merge", "--base", str(runs["base"]), "--adapter", str(runs[strategy] / "adapter"), "--out", str(out))
    offline, exported = ModelDir(out), ModelDir(runs[strategy] / "merged")
    assert set(offline.keys()) == set(exported.keys())
    for key in offline.keys():
        assert torch.equal(offline.read(key), exported.read(key)), key


@pytest.mark.dist
def test_export_of_a_finished_run_rebuilds_it_sharded(runs, tmp_path):
    """``lora-dist export RUN_DIR`` on 2 ranks loads the MoE base sharded again and writes the same checkpoint."""
    out = tmp_path / "again"
    ranks(2, "-m", "lora_dist.cli", "export", str(runs["fsdp2"]), "--out", str(out))
    again, first = ModelDir(out), ModelDir(runs["fsdp2"] / "merged")
    assert set(again.keys()) == set(first.keys())
    for key in first.keys():
        assert torch.equal(again.read(key), first.read(key)), key


@pytest.mark.parametrize(("edit", "match"), [
    ({"r": 2}, r"self_attn.q_proj holds rank-4 tensors but adapter_config.json gives it r=2"),
    ({"target_modules": None, "target_parameters": ["mlp.experts.down_proj"]},
     r"adapter modules not in the model: \['model.layers.0.mlp.experts.base_layer'"),
    ({"rank_pattern": {r"model\.layers\.0\.mlp\.experts\.gate_up_proj": 2}},
     r"model.layers.0.mlp.experts.gate_up_proj \(4, 256, 32\): the adapter's lora_A \(16, 32\) / lora_B \(256, 16\) "
     r"are not \(8, 32\) / \(256, 8\) for r=2"),
])
def test_an_expert_adapter_that_does_not_fit_is_refused_in_one_line(tiny_checkpoint, tmp_path, edit, match):
    from lora_dist.adapter import AdapterError, load_adapter, save_adapter
    from lora_dist.export import merge_offline

    path = tiny_checkpoint("mixtral")
    save_adapter(_expert_lora_model(path), tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    for attempt in (lambda: load_adapter(_hf_model(path), tmp_path / "adapter"),
                    lambda: merge_offline(path, tmp_path / "adapter", tmp_path / "out")):
        with pytest.raises(AdapterError, match=match) as e:
            attempt()
        assert "\n" not in str(e.value)


def test_layers_to_transform_selects_expert_params_and_peft_reproduces_them(tiny_checkpoint, tmp_path):
    """With a selection rule PEFT's config cannot express, the adapter names the adapted parameters in full."""
    import peft

    from lora_dist.adapter import save_adapter

    path = tiny_checkpoint("qwen3_moe")
    ours = _expert_lora_model(path, layers_to_transform=[1]).eval()
    _randomize_b(ours)
    assert [n for n, p in ours.named_parameters() if p.requires_grad and ".experts." in n] == [
        f"model.layers.1.mlp.experts.lora.{p}.lora_{x}.weight" for p in ("gate_up_proj", "down_proj") for x in "AB"]
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.1.{p}" for p in sorted(TARGET_PARAMETERS)]
    twin = peft.PeftModel.from_pretrained(_hf_model(path), tmp_path / "adapter").eval()
    assert not any(".layers.0.mlp.experts.lora" in n for n, _ in twin.named_parameters())
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- experts stored transposed (Qwen3-VL-MoE)

#: The language model's fused experts of a Qwen3-VL-MoE checkpoint.
VL_EXPERTS = tuple(f"model.language_model.layers.0.{p}" for p in FUSED)


def _vl_model(path: Path) -> torch.nn.Module:
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen3_vl_moe(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3-VL-MoE saved by transformers (experts as held, (E, 2I, H) and (E, H, I)), the same model with its
    experts in the Hub's layout ((E, H, 2I) and (E, I, H), which transformers transposes at load), and a PEFT adapter
    on both experts with random B."""
    import peft
    import transformers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("qwen3-vl-moe")
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, num_experts=MOE_EXPERTS, num_experts_per_tok=2,
                head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=2,
                  temporal_patch_size=1, spatial_merge_size=1, deepstack_visual_indexes=[])
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    transformers.Qwen3VLMoeForConditionalGeneration(config).save_pretrained(root / "base")
    shutil.copytree(root / "base", root / "hub")
    tensors = load_file(str(root / "hub" / "model.safetensors"))
    for key in VL_EXPERTS:
        tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, str(root / "hub" / "model.safetensors"), metadata={"format": "pt"})
    model = peft.get_peft_model(_vl_model(root / "hub"), peft.LoraConfig(r=2, lora_alpha=4,
                                                                         target_parameters=TARGET_PARAMETERS))
    randomize_lora_B(model, 1, 0.5)
    model.save_pretrained(root / "adapter")
    return {"base": root / "base", "hub": root / "hub", "adapter": root / "adapter"}


def test_experts_stored_transposed_are_read_as_transformers_reads_them(qwen3_vl_moe):
    """transformers transposes Qwen3-VL-MoE's experts only where the stored shape is not the model's
    (Transpose(1, 2, check_dims=True)): the loader's sources read each flat range as transformers holds it."""
    from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

    from lora_dist.weight_mapping import Transposed

    hub = ModelDir(qwen3_vl_moe["hub"])
    assert hub.shape(VL_EXPERTS[0]) == (MOE_EXPERTS, 32, 16) and hub.shape(VL_EXPERTS[1]) == (MOE_EXPERTS, 8, 32)
    with torch.device("meta"):
        meta = Qwen3VLMoeForConditionalGeneration(AutoConfig.from_pretrained(qwen3_vl_moe["hub"]))
    held = _vl_model(qwen3_vl_moe["hub"]).state_dict()
    for path, kind in ((qwen3_vl_moe["hub"], Transposed), (qwen3_vl_moe["base"], FileTensor)):
        weights = WeightMap.of(ModelDir(path), meta)
        for name in VL_EXPERTS:
            source = weights.source(name)
            assert type(source) is kind and source.shape == held[name].shape, (path, name)
            flat = held[name].reshape(-1)
            for a, b in ((0, flat.numel()), (3, 5), (200, 1000), (flat.numel() // 4 + 7, flat.numel() - 1)):
                assert torch.equal(source.read_flat(a, b), flat[a:b]), (path, name, a, b)
    from lora_dist.config import ModelConfig, ParallelConfig
    from lora_dist.lora import LoRAConfig
    from lora_dist.model import load_model

    loaded = load_model(ModelConfig(path=str(qwen3_vl_moe["hub"]), dtype="float32"),
                        LoRAConfig(target_modules=None, target_parameters=TARGET_PARAMETERS),
                        ParallelConfig(strategy="none"), torch.device("cpu"), seed=0).model
    ours = dict(loaded.named_parameters())
    assert all(torch.equal(ours[name], value) for name, value in held.items())  # the sharded loader's reads
    with pytest.raises(WeightMappingError, match="transposes .* only where its shape is not the model's") as e:
        WeightMap(hub, model_transforms(meta)).source(VL_EXPERTS[0])  # no model to compare the shape with
    assert "\n" not in str(e.value)


def test_experts_stored_transposed_merge_like_peft_and_keep_their_layout(qwen3_vl_moe, tmp_path):
    """`lora-dist merge` and the export from the trained model write the Hub layout, merged with each expert's
    delta transposed: equal to PEFT's merge_and_unload, and to each other bit for bit."""
    import peft

    from lora_dist.adapter import load_adapter
    from lora_dist.export import export_merged, merge_offline, verify_checkpoint

    hub, adapter = qwen3_vl_moe["hub"], qwen3_vl_moe["adapter"]
    reference = peft.PeftModel.from_pretrained(_vl_model(hub), adapter).merge_and_unload().state_dict()
    base = _vl_model(hub).state_dict()
    assert all((reference[k] - base[k]).abs().max() > 0.1 for k in VL_EXPERTS)  # the adapter changes the experts
    merge_offline(hub, adapter, tmp_path / "offline", dtype="float32")
    export_merged(load_adapter(_vl_model(hub), adapter), tmp_path / "export", hub, dtype=torch.float32)
    for out in ("offline", "export"):
        merged = ModelDir(tmp_path / out)
        assert all(merged.shape(k) == ModelDir(hub).shape(k) for k in VL_EXPERTS)  # written as the Hub stores them
        state = _vl_model(tmp_path / out).state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{out} {key}: {m}")
        verify_checkpoint(tmp_path / out, base_dir=hub, adapter_dir=adapter, sample=None)
    offline, export = ModelDir(tmp_path / "offline"), ModelDir(tmp_path / "export")
    assert all(torch.equal(offline.read(k), export.read(k)) for k in offline.keys())
