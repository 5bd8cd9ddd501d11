"""Checkpoints published quantized, as the Hub ships DeepSeek-V3 and the Qwen3 ``-FP8`` releases
(block-scaled FP8) and gpt-oss (MXFP4 experts): lora_dist reads the weights transformers' own dequantizing load
gives, trains on them exactly as on the model's dense release (one process and 2 ranks), and exports the merged
checkpoint as the base stores it (block-scaled FP8) or dense. Other quantized checkpoints are refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distutil import assert_same_grad_norms, assert_same_losses, assert_same_run, logged, lora_dist, ranks, short_run_args
from lora_dist.demo import write_demo_data
from lora_dist.model_dir import ModelDir, ModelDirError
from lora_dist.prequantized import dequantize_fp8

BLOCK = 16  # FP8 scale blocks (the Hub's are 128 x 128; the tiny model's weights are 64 wide)
STEPS, LR = 3, 5e-3


def _copy_dir(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization: dict | None) -> Path:
    """``src``'s tokenizer and config (with ``quantization``) and ``tensors`` as its one weight file."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copyfile(f, dst / f.name)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization:
        config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def quantize_fp8(src: Path, dst: Path, block: int = BLOCK, pow2: str = "") -> Path:
    """``src`` with every projection of its layers stored as DeepSeek-V3 stores them: ``F8_E4M3`` blocks, each
    scaled to the format's range, and their ``weight_scale_inv`` (ceil(rows / block) x ceil(cols / block): the
    last blocks overhang a weight that ``block`` does not divide). ``pow2``: scales rounded up to powers of two,
    stored as ``F8_E8M0`` ("e8m0") or as fp32 under ``scale_fmt: ue8m0`` ("ue8m0", DeepSeek-V3.1's)."""
    out = {}
    for key, w in load_file(src / "model.safetensors").items():
        if ".layers." in key and key.endswith("proj.weight"):
            rows, cols = w.shape
            grid = (math.ceil(rows / block), math.ceil(cols / block))
            padded = torch.nn.functional.pad(w.float(), (0, grid[1] * block - cols, 0, grid[0] * block - rows))
            blocks = padded.reshape(grid[0], block, grid[1], block)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            if pow2:
                scale = torch.exp2(torch.ceil(torch.log2(scale)))
            q = (blocks / scale[:, None, :, None]).reshape(grid[0] * block, grid[1] * block)[:rows, :cols]
            out[key] = q.to(torch.float8_e4m3fn).contiguous()
            out[key + "_scale_inv"] = scale.to(torch.float8_e8m0fnu) if pow2 == "e8m0" else scale
        else:
            out[key] = w
    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [block, block]}
    return _copy_dir(src, dst, out, {**quantization, "scale_fmt": "ue8m0"} if pow2 == "ue8m0" else quantization)


def quantize_mxfp4(src: Path, dst: Path) -> Path:
    """``src`` (gpt-oss) with its experts stored as gpt-oss's release stores them: ``W_blocks`` ``(E, out, in/32,
    16)`` and ``W_scales`` ``(E, out, in/32)``, here random codes and scales near 2**-6."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for key, w in load_file(src / "model.safetensors").items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, fan_in, fan_out = w.shape
            out[key + "_blocks"] = torch.randint(0, 256, (experts, fan_out, fan_in // 32, 16), generator=generator,
                                                 dtype=torch.uint8)
            out[key + "_scales"] = torch.randint(118, 124, (experts, fan_out, fan_in // 32), generator=generator,
                                                 dtype=torch.uint8)
        else:
            out[key] = w
    return _copy_dir(src, dst, out, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


def transformers_load(path: Path) -> torch.nn.Module:
    """The checkpoint as transformers loads it dequantized (bf16): the reference."""
    import transformers

    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    config = (transformers.Mxfp4Config(dequantize=True) if quant["quant_method"] == "mxfp4" else
              transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=tuple(quant["weight_block_size"])))
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16)


def dense_release(path: Path, dst: Path) -> Path:
    """The model's dense release: transformers' dequantized weights saved under their names, no quantization."""
    model = transformers_load(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return _copy_dir(path, dst, state, None)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Per format: the quantized checkpoint and its dense release."""
    root = tmp_path_factory.mktemp("prequantized")
    fp8 = quantize_fp8(tiny_checkpoint("qwen3", dtype=torch.bfloat16), root / "fp8")
    mxfp4 = quantize_mxfp4(tiny_checkpoint("gpt_oss", dtype=torch.bfloat16), root / "mxfp4")
    return {"fp8": (fp8, dense_release(fp8, root / "fp8-dense")),
            "mxfp4": (mxfp4, dense_release(mxfp4, root / "mxfp4-dense"))}


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_the_weights_are_those_transformers_dequantizes(checkpoints, fmt):
    quantized, _ = checkpoints[fmt]
    base = ModelDir(quantized)
    state = transformers_load(quantized).state_dict()
    if "lm_head.weight" not in base:
        state.pop("lm_head.weight", None)  # tied to the embedding
    assert base.quantized and sorted(base.keys()) == sorted(state)
    stored = set(base.stored_keys())
    assert not any(k.endswith(("_scale_inv", "_blocks", "_scales")) for k in base.keys())
    if fmt == "mxfp4":  # the experts' dense names are no stored tensor's
        assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"} - stored == {
            "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
        assert base.shape("model.layers.0.mlp.experts.gate_up_proj") == tuple(state["model.layers.0.mlp.experts.gate_up_proj"].shape)
    for key in base.keys():
        whole = base.read(key)
        assert whole.dtype == state[key].dtype and torch.equal(whole, state[key]), key
        assert base.shape(key) == tuple(whole.shape) and base.dtype(key) == "BF16", key
        if whole.dim() >= 2 and whole.shape[0] >= 3:  # a rank's rows, and a ZeRO-3 partition cutting rows
            assert torch.equal(base.read(key, slice(1, 3)), whole[1:3]), key
            n = whole.numel()
            assert torch.equal(base.read_flat(key, 7, n - 5), whole.reshape(-1)[7:n - 5]), key
    assert base.hf_config.to_dict().get("quantization_config") is None  # the model is built dense


def test_fp8_blocks_that_overhang_the_weight():
    """DeepSeek-V3's grid is ceil(rows/128) x ceil(cols/128): the last blocks' scales cover what is left."""
    weight = torch.randn(5, 7).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2) + 0.5  # blocks of (2, 4)
    want = torch.tensor([[float(weight[r, c].float()) * float(scale[r // 2, c // 4]) for c in range(7)]
                         for r in range(5)])
    assert torch.equal(dequantize_fp8(weight, scale, (2, 4)), want)
    assert torch.equal(dequantize_fp8(weight[3:], scale[1:], (2, 4), first_row=3), want[3:])


def test_fp8_blocks_that_overhang_the_weight_read_and_generate(tiny_checkpoint, tmp_path):
    """DeepSeek-V3's kv_a_proj_with_mqa (576 x 7168) ends in partial 128-blocks, which transformers' dequantizing
    load refuses. lora_dist reads them as a block-by-block loop computes them, and ``generate`` builds the model
    from those weights: the same greedy reply as from the dense checkpoint they make."""
    from lora_dist.generate import generate

    block = 24  # the tiny model's 64 x 64 and 64 x 256 weights end in partial blocks
    fp8 = quantize_fp8(tiny_checkpoint("qwen3", dtype=torch.bfloat16), tmp_path / "fp8", block)
    stored, want = load_file(fp8 / "model.safetensors"), {}
    for key, q in stored.items():
        if key.endswith("_scale_inv"):
            continue
        if key + "_scale_inv" not in stored:
            want[key] = q
            continue
        scale, w = stored[key + "_scale_inv"], torch.empty(q.shape)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
                w[rows, cols] = q[rows, cols].float() * scale[i, j]
        want[key] = w.to(torch.bfloat16)
    base = ModelDir(fp8)
    assert sorted(base.keys()) == sorted(want)
    assert all(torch.equal(base.read(k), w) for k, w in want.items())
    dense = _copy_dir(fp8, tmp_path / "dense", want, None)
    replies = [generate(path, prompt="the red fox", max_new_tokens=8, device="cpu") for path in (fp8, dense)]
    assert replies[0].new_tokens == replies[1].new_tokens and len(replies[0].new_tokens) == 8


@pytest.mark.dist
@pytest.mark.parametrize("fmt,strategy", [("fp8", "fsdp2"), ("mxfp4", "zero3")])
def test_training_on_a_quantized_checkpoint_equals_its_dense_release(checkpoints, fmt, strategy, tmp_path):
    """One process and 2 ranks on the quantized checkpoint train bitwise as on the dense release, and 2 ranks as
    one process (their losses and gradient norms; the adapters of this model sit too close to the suite's bound
    to call, a rounding in Adam's normalization of a near-zero gradient); the merged export is the dense
    release's merged export, with no quantization left, and verifies against the quantized base; ``lora-dist
    merge`` from the quantized base writes the same."""
    quantized, dense = checkpoints[fmt]
    data = write_demo_data(tmp_path / "data.jsonl", n=200)
    extra = ["lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"] if fmt == "mxfp4" else []
    # trained in fp32 (the bf16 weights exactly): rank-order rounding stays far below the tolerance
    common = [*short_run_args(quantized, data, STEPS, LR, "all-linear", *extra), "model.dtype=float32",
              "export.merged=true", "export.keep_fp8=false"]  # dense: test_fp8_merged_export_is_stored_as_the_base
    lora_dist("train", *common, f"output.dir={tmp_path / 'one'}", "parallel.strategy=none", "train.micro_batch_size=4")
    lora_dist("train", *common, f"model.path={dense}", f"output.dir={tmp_path / 'dense'}", "parallel.strategy=none",
              "train.micro_batch_size=4")
    for name, path in (("two", quantized), ("two-dense", dense)):
        ranks(2, "-m", "lora_dist.cli", "train", *common, f"model.path={path}", f"output.dir={tmp_path / name}",
              f"parallel.strategy={strategy}", "train.micro_batch_size=2", "export.merged=false")
    assert_same_run(tmp_path / "one", tmp_path / "dense", atol=0.0, loss_atol=0.0)
    assert_same_run(tmp_path / "two", tmp_path / "two-dense", atol=0.0, loss_atol=0.0)
    assert_same_losses(logged(tmp_path / "two"), logged(tmp_path / "one"), 1e-5)
    assert_same_grad_norms(tmp_path / "two", tmp_path / "one")

    merged, want = tmp_path / "one" / "merged", load_file(tmp_path / "dense" / "merged" / "model.safetensors")
    got = load_file(merged / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    lora_dist("verify", str(merged), "--base", str(quantized), "--adapter", str(tmp_path / "one" / "adapter"),
              "--sample", "-1")
    lora_dist("merge", "--base", str(quantized), "--adapter", str(tmp_path / "one" / "adapter"),
              "--out", str(tmp_path / "offline"), "--dense")
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    assert sorted(offline) == sorted(want) and all(torch.equal(offline[k], want[k]) for k in want)


def _blockwise_fp8(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test's own block quantizer (as quantize_fp8 above): each block over its largest magnitude / 448."""
    rows, cols = values.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    codes, scale = torch.empty(rows, cols, dtype=torch.float8_e4m3fn), torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = values[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max() / 448.0
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return codes, scale


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.float8_e8m0fnu])
def test_quantizing_again_keeps_each_value_within_half_a_step(scale_dtype):
    """``quantize_fp8`` (the merged export of an FP8 base): every value within half an FP8 step of its block's scale,
    no block beyond the format's range, E8M0 scales powers of two, an all-zero block scale 1, overhanging blocks;
    and a weight quantized again unchanged gives back its codes and scales (fp32 scales)."""
    from lora_dist.prequantized import FP8Blocks, quantize_fp8

    values = torch.randn(37, 45) * torch.logspace(-3, 2, 45)
    values[:16, :16] = 0
    pow2 = scale_dtype in (torch.uint8, torch.float8_e8m0fnu)
    blocks = FP8Blocks(torch.float8_e4m3fn, "w_scale_inv", scale_dtype, (3, 3), (16, 16), pow2)
    codes, scale = quantize_fp8(values, blocks)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == scale_dtype and scale.shape == (3, 3)
    as_float = scale.float() if scale_dtype != torch.uint8 else torch.exp2(scale.float() - 127)
    if pow2:
        assert torch.equal(as_float, torch.exp2(torch.log2(as_float).round()))
    assert as_float[0, 0] == 1 and not codes[:16, :16].float().any()
    back = dequantize_fp8(codes, scale, (16, 16))
    per_element = dequantize_fp8(torch.ones(37, 45), scale, (16, 16))
    # E4M3's half step: 2**-4 of a normal value, 2**-10 of the scale for a subnormal one
    assert bool(((back - values).abs() <= torch.maximum(values.abs() * 2.0 ** -4, per_element * 2.0 ** -10)).all())
    if scale_dtype == torch.float32:
        again = quantize_fp8(back, blocks)
        assert torch.equal(again[0].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(again[1], scale)


@pytest.mark.dist
def test_fp8_merged_export_is_stored_as_the_base(checkpoints, tmp_path):
    """The merged export of an FP8 base keeps the base's format (export.keep_fp8, the default): every tensor the
    adapter does not touch is the base's bytes (codes, scales, norms), ``quantization_config`` is kept, and each
    adapted weight is its fp32 merge quantized again block by block (codes and scales equal to the test's own
    quantizer over the dense fp32 export), a byte per element. 2 FSDP2 ranks, splitting the blocks,
    write the file ``lora-dist merge`` writes from their adapter on one process; ``verify`` passes it and fails it
    against another adapter; transformers loads it."""
    quantized, _ = checkpoints["fp8"]
    data = write_demo_data(tmp_path / "data.jsonl", n=200)
    common = [*short_run_args(quantized, data, STEPS, LR, "all-linear"), "model.dtype=float32", "export.merged=true"]
    ranks(2, "-m", "lora_dist.cli", "train", *common, f"output.dir={tmp_path / 'two'}", "parallel.strategy=fsdp2",
          "train.micro_batch_size=2")
    merged, adapter = tmp_path / "two" / "merged", tmp_path / "two" / "adapter"
    lora_dist("merge", "--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "offline"))
    lora_dist("merge", "--base", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "dense"),
              "--dense", "--dtype", "float32")
    got, base = load_file(merged / "model.safetensors"), load_file(quantized / "model.safetensors")
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    assert sorted(got) == sorted(base) == sorted(offline)
    assert all(got[k].dtype == base[k].dtype and got[k].shape == base[k].shape for k in base)
    assert (merged / "model.safetensors").read_bytes() == (tmp_path / "offline" / "model.safetensors").read_bytes()
    config = json.loads((merged / "config.json").read_text())
    assert config["quantization_config"] == json.loads((quantized / "config.json").read_text())["quantization_config"]
    adapted = {k for k in base if k.endswith("proj.weight")}
    assert adapted and all(base[k].dtype == torch.float8_e4m3fn for k in adapted)
    for key in base:
        if key in adapted:
            codes, scale = _blockwise_fp8(dense[key], BLOCK)
            assert torch.equal(got[key].view(torch.uint8), codes.view(torch.uint8)), key
            assert torch.equal(got[key + "_scale_inv"], scale), key
            assert not torch.equal(got[key].view(torch.uint8), base[key].view(torch.uint8)), key  # trained
        elif not key.removesuffix("_scale_inv") in adapted:
            assert torch.equal(got[key], base[key]), key  # the base's bytes
    # a byte per adapted weight element (bf16: 2); the tiny model's bf16 embedding and head are most of the rest
    size = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
    assert size < sum(t.numel() * 2 for t in dense.values())
    lora_dist("verify", str(merged), "--base", str(quantized), "--adapter", str(adapter), "--sample", "-1")
    lora_dist("train", *common, f"output.dir={tmp_path / 'other'}", "parallel.strategy=none", "train.seed=1",
              "export.merged=false")
    proc = lora_dist("verify", str(merged), "--base", str(quantized), "--adapter", str(tmp_path / "other" / "adapter"),
                     "--sample", "-1", check=False)
    assert proc.returncode == 1 and "differ from base + adapter quantized again" in proc.stderr + proc.stdout
    state = transformers_load(merged).state_dict()
    for key in adapted:
        deq = dequantize_fp8(got[key], got[key + "_scale_inv"], (BLOCK, BLOCK)).to(torch.bfloat16)
        assert torch.equal(state[key], deq), key


@pytest.mark.dist
def test_fp8_blocks_cut_by_the_ranks_shards_export_whole(tiny_checkpoint, tmp_path):
    """Blocks of 24 rows over 64-row weights (the last one partial, as DeepSeek-V3's 576-row kv_a_proj_with_mqa in
    128-blocks), 3 ranks: FSDP2 shards of 22 rows cut blocks, the export's ranks split whole blocks instead, and
    ``lora-dist export`` writes the offline merge's file, byte for byte."""
    fp8 = quantize_fp8(tiny_checkpoint("qwen3", dtype=torch.bfloat16), tmp_path / "fp8", 24)
    data = write_demo_data(tmp_path / "data.jsonl", n=200)
    lora_dist("train", *short_run_args(fp8, data, 2, LR, "all-linear"), f"output.dir={tmp_path / 'run'}",
              "parallel.strategy=none")
    ranks(3, "-m", "lora_dist.cli", "export", str(tmp_path / "run"), "--out", str(tmp_path / "three"))
    lora_dist("merge", "--base", str(fp8), "--adapter", str(tmp_path / "run" / "adapter"), "--out",
              str(tmp_path / "one"))
    three = (tmp_path / "three" / "model.safetensors").read_bytes()
    assert three == (tmp_path / "one" / "model.safetensors").read_bytes()
    got = load_file(tmp_path / "three" / "model.safetensors")
    shapes = {k: tuple(w.shape) for k, w in got.items() if k + "_scale_inv" in got}
    assert all(got[k + "_scale_inv"].shape == (math.ceil(r / 24), math.ceil(c / 24)) for k, (r, c) in shapes.items())
    assert any(r % 24 for r, _ in shapes.values())  # partial last blocks


@pytest.mark.parametrize("pow2", ["e8m0", "ue8m0"])
def test_power_of_two_scales_stay_powers_of_two(tiny_checkpoint, tmp_path, pow2):
    """Scales stored as ``F8_E8M0`` (which did not open before) or as fp32 under ``scale_fmt: ue8m0`` (DeepSeek-V3.1,
    GLM-5-FP8; kernels read them as powers of two) are written again as powers of two, rounded up, in their dtype;
    ``verify`` passes the export and fails it with one block's scale halved (its largest values clipped)."""
    fp8 = quantize_fp8(tiny_checkpoint("qwen3", dtype=torch.bfloat16), tmp_path / "fp8", BLOCK, pow2)
    key = "model.layers.0.mlp.down_proj.weight"
    assert ModelDir(fp8).fp8_blocks(key).pow2
    data = write_demo_data(tmp_path / "data.jsonl", n=100)
    lora_dist("train", *short_run_args(fp8, data, 2, LR, "all-linear"), f"output.dir={tmp_path / 'run'}",
              "parallel.strategy=none")
    out, adapter = tmp_path / "merged", tmp_path / "run" / "adapter"
    lora_dist("merge", "--base", str(fp8), "--adapter", str(adapter), "--out", str(out))
    got, base = load_file(out / "model.safetensors"), load_file(fp8 / "model.safetensors")
    scales = {k: v for k, v in got.items() if k.endswith("_scale_inv")}
    assert scales and all(v.dtype == base[k].dtype for k, v in scales.items())
    assert all(torch.equal(v.float(), torch.exp2(torch.log2(v.float()).round())) for v in scales.values())
    assert not torch.equal(got[key].view(torch.uint8), base[key].view(torch.uint8))  # merged and quantized again
    lora_dist("verify", str(out), "--base", str(fp8), "--adapter", str(adapter), "--sample", "-1")
    tampered = dict(got)
    tampered[key + "_scale_inv"] = (got[key + "_scale_inv"].float() / 2).to(got[key + "_scale_inv"].dtype)
    save_file(tampered, out / "model.safetensors", metadata={"format": "pt"})
    proc = lora_dist("verify", str(out), "--base", str(fp8), "--adapter", str(adapter), "--sample", "-1", check=False)
    assert proc.returncode == 1 and f"'{key}': its block scales differ" in proc.stderr + proc.stdout


def test_fp8_experts_adapted_through_target_parameters_export_as_stored(tiny_checkpoint, tmp_path):
    """Qwen3-30B-A3B-FP8 stores each expert's projections as FP8: LoRA on the fused experts
    (``lora.target_parameters``) is merged into each expert's tensor and quantized again at the end of training
    (before, the run refused after training), the file the offline merge writes."""
    fp8 = quantize_fp8(tiny_checkpoint("qwen3_moe", dtype=torch.bfloat16), tmp_path / "fp8")
    experts = [k for k in load_file(fp8 / "model.safetensors") if ".experts.0." in k and k.endswith("proj.weight")]
    assert experts and all(ModelDir(fp8).fp8_blocks(k) is not None for k in experts)
    data = write_demo_data(tmp_path / "data.jsonl", n=100)
    run = tmp_path / "run"
    lora_dist("train", *short_run_args(fp8, data, 2, LR, "[q_proj,v_proj]"), f"output.dir={run}",
              "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]", "parallel.strategy=none",
              "export.merged=true")
    lora_dist("merge", "--base", str(fp8), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "offline"))
    assert (run / "merged" / "model.safetensors").read_bytes() == (tmp_path / "offline" / "model.safetensors").read_bytes()
    got, base = load_file(run / "merged" / "model.safetensors"), load_file(fp8 / "model.safetensors")
    assert all(got[k].dtype == torch.float8_e4m3fn and not torch.equal(got[k].view(torch.uint8),
                                                                         base[k].view(torch.uint8)) for k in experts)
    lora_dist("verify", str(run / "merged"), "--base", str(fp8), "--adapter", str(run / "adapter"), "--sample", "-1")


@pytest.mark.parametrize("quantization,problem", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantized with 'bitsandbytes'"),
    ({"quant_method": "gptq", "bits": 4}, "quantized with 'gptq'"),
    ({"load_in_8bit": True}, "quantized with an unnamed method"),
])
def test_other_quantized_checkpoints_are_refused_in_one_line(tiny_checkpoint, tmp_path, quantization, problem):
    src = tiny_checkpoint("qwen3", dtype=torch.bfloat16)
    path = _copy_dir(src, tmp_path / "q", load_file(src / "model.safetensors"), quantization)
    with pytest.raises(ModelDirError, match=problem) as e:
        ModelDir(path)
    assert "\n" not in str(e.value) and "unquantized release" in str(e.value)
    run = lora_dist("train", f"model.path={path}", f"output.dir={tmp_path / 'run'}", check=False)
    assert run.returncode == 2 and problem in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()


def test_fp8_weights_without_their_scales_are_refused(checkpoints, tmp_path):
    """An FP8 weight read without its scale would be off by the block's scale: never read as it is."""
    quantized, _ = checkpoints["fp8"]
    tensors = load_file(quantized / "model.safetensors")
    key = next(k for k in tensors if k.endswith("_scale_inv"))
    del tensors[key]
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    path = _copy_dir(quantized, tmp_path / "no-scale", tensors, config)
    with pytest.raises(ModelDirError, match=f"{key.removesuffix('_scale_inv')} is stored as F8_E4M3 without a scale"):
        ModelDir(path)
    # a scale grid that is not the weight's blocks
    tensors = load_file(quantized / "model.safetensors")
    tensors[key] = tensors[key][:, :1].contiguous()
    path = _copy_dir(quantized, tmp_path / "bad-grid", tensors, config)
    rows, cols = tensors[key.removesuffix("_scale_inv")].shape
    with pytest.raises(ModelDirError, match=rf"not the \({math.ceil(rows / BLOCK)}, {math.ceil(cols / BLOCK)}\) blocks"):
        ModelDir(path)
