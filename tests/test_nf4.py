"""QLoRA (``model.quantize: nf4``): NF4 storage, own-row quantization, training equal across ranks, export, planner.

The distributed checks run this file under torchrun (``python -m torch.distributed.run ... tests/test_nf4.py OUT``):
one launch loads an fsdp2 model with an NF4 base on 2 ranks, records each rank's NF4 shard and writes a merged
export, which the test compares with references computed here in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

from distutil import (
    adapter_atol,
    assert_same_run,
    in_fresh_process,
    logged,
    ranks,
    short_run_args,
    step_peak,
    train_run,
)
from lora_dist.config import ConfigError, load_config
from lora_dist.nf4 import (
    GROUP,
    dequantize,
    dequantize_flat,
    dequantize_rows,
    embedding_rows,
    frozen_linear,
    is_quantized,
    nf4_bytes,
    nf4_quantizable,
    quantize_whole,
)

#: hidden 256: every block linear of the tiny Llama is whole 16384-element NF4 groups on 1 and on 2 ranks.
SIZES = dict(hidden=256, layers=2)
#: The embedding and head padded to 512 rows (the tokenizer has 489): whole NF4 groups on 1 and on 2 ranks, so
#: model.quantize_embeddings quantizes them.
PADDED = dict(SIZES, vocab=512)
STEPS, LR = 3, 5e-3
ADAPTER_ATOL = adapter_atol(LR, STEPS)  # ranks sum in another order than one process
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _inner_bytes(t) -> int:
    return sum(getattr(t, a).nbytes for a in t.__tensor_flatten__()[0])


# ----------------------------------------------------------------------------- NF4 pieces, one process


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 100])  # one chunk; 3 blocks (of 64 elements) per chunk
# code pairs in 32 and 64 bits; float64 has no integer type two codes wide: each nibble looked up
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
def test_dequantize_is_torchaos_dequantization_bitwise_also_in_ranges(monkeypatch, chunk_bytes, dtype):
    import lora_dist.nf4

    monkeypatch.setattr(lora_dist.nf4, "_DEQUANT_CHUNK_BYTES", chunk_bytes)
    w = torch.randn(64, 512, dtype=dtype, generator=torch.Generator().manual_seed(0))
    q = to_nf4(w)
    ref = q.get_original_weight()
    assert ref.dtype == dtype
    assert torch.equal(dequantize(q), ref)
    assert torch.equal(dequantize(q, torch.float32), ref.float())
    ids = torch.tensor([[0, 63, 5], [5, 17, 40]])
    assert torch.equal(embedding_rows(q, ids), F.embedding(ids, ref))
    flat = ref.reshape(-1)
    # 512 blocks in two scale groups of 256: ranges in the first, across both, and within the second only (only
    # the groups a range touches have their scales dequantized)
    for a, b in ((0, 1), (5, 70), (63, 64 * 300 + 17), (1000, w.numel()), (GROUP, GROUP + 64),
                 (GROUP + 100, w.numel() - 3)):
        assert torch.equal(dequantize_flat(q, a, b), flat[a:b])
    for a, b in ((0, 3), (10, 40), (32, 64)):  # rows of a head, as the chunked loss dequantizes them
        assert torch.equal(dequantize_rows(q, a, b, torch.float32), ref[a:b].float())
    assert not torch.equal(ref, w)  # 4 bits: not the original
    if dtype != torch.float64:  # the pair table is made once per code table, and the decodes above reused it
        from lora_dist.nf4 import _code_pairs

        assert _code_pairs(q) is _code_pairs(q) is q.nf4._lora_dist_pairs


def test_frozen_linear_output_and_input_gradient_use_the_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(128, 256, generator=g), torch.randn(128, generator=g)
    q = to_nf4(w)
    x = torch.randn(3, 256, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = frozen_linear(x, q, bias)
    ref = F.linear(x_ref, q.get_original_weight(), bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    grad = torch.randn(3, 128, generator=g)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    assert not torch.allclose(out, F.linear(x.detach(), w, bias), atol=1e-3)  # the NF4 weight, not the original


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedding_rows_are_the_dequantized_weights_rows_bitwise(dtype):
    """An NF4 embedding's lookup dequantizes only the rows it reads, to exactly what the whole weight
    dequantizes to (several scale groups: rows 0 and 511 sit in the first and last)."""
    w = to_nf4(torch.randn(512, 128, generator=torch.Generator().manual_seed(0)).to(dtype))
    ids = torch.tensor([[3, 511, 0, 3], [7, 100, 256, 255]])
    rows = embedding_rows(w, ids)
    assert rows.dtype == dtype and rows.shape == (2, 4, 128)
    assert torch.equal(rows, F.embedding(ids, dequantize(w)))
    plain = torch.randn(10, 8)
    assert torch.equal(embedding_rows(plain, ids % 10), F.embedding(ids % 10, plain))


@pytest.mark.parametrize("shape,dtype", [((256, 256), torch.bfloat16), ((64, 1024), torch.float32),
                                         ((512, 1024), torch.bfloat16)])
def test_nf4_bytes_is_torchaos_layout(shape, dtype):
    q = to_nf4(torch.randn(shape, dtype=dtype))
    numel = shape[0] * shape[1]
    assert nf4_bytes(numel, dtype.itemsize) == _inner_bytes(q)
    assert nf4_bytes(numel, 2) <= 0.26 * numel * 2  # about a quarter of bf16


def test_quantizable_needs_whole_groups_per_rank():
    assert nf4_quantizable((256, 256), 1) and nf4_quantizable((256, 256), 2) and nf4_quantizable((256, 256), 4)
    assert not nf4_quantizable((256, 256), 8)  # 32 rows x 256 = 8192 elements per rank
    assert not nf4_quantizable((255, 256), 1) and not nf4_quantizable((254, 256 * 64), 4)  # rows do not divide
    assert not nf4_quantizable((GROUP,), 1)  # 1-D: norms, biases


# ----------------------------------------------------------------------------- bad input: one line each


@pytest.mark.parametrize("overrides,message", [
    (["model.quantize=int4"], "model.quantize='int4' is not one of"),
    (["model.quantize=nf4", "parallel.strategy=zero3"], "model.quantize=nf4 runs under parallel.strategy fsdp2, ddp"),
    (["model.quantize=nf4", "parallel.strategy=zero2"], "not zero2"),
    (["model.quantize_embeddings=true"], "model.quantize_embeddings=true needs model.quantize=nf4"),
])
def test_bad_quantize_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_missing_torchao_is_one_line_naming_the_extra(tiny_checkpoint, monkeypatch):
    from lora_dist.model import load_model

    cfg = load_config(None, [f"model.path={tiny_checkpoint('llama', **SIZES)}", "model.quantize=nf4",
                             "parallel.strategy=none"])
    monkeypatch.setitem(sys.modules, "torchao.quantization.quantize_.workflows.nf4.nf4_tensor", None)
    with pytest.raises(ConfigError, match=r"needs torchao: pip install 'lora_dist\[quant\]'") as e:
        load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0)
    assert "\n" not in str(e.value)


def test_zero3_is_refused_by_load_model_too(tiny_checkpoint):
    from lora_dist.model import load_model

    cfg = load_config(None, [f"model.path={tiny_checkpoint('llama', **SIZES)}"])
    cfg.model.quantize, cfg.parallel.strategy = "nf4", "zero3"  # past the config's own check
    with pytest.raises(ConfigError, match="not zero3"):
        load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0)


# ----------------------------------------------------------------------------- loading, one process


def test_one_process_quantizes_the_block_linears_and_nothing_else(tiny_checkpoint):
    from safetensors.torch import load_file

    from lora_dist.model import load_model

    path = tiny_checkpoint("llama", **SIZES)
    cfg = load_config(None, [f"model.path={path}", "model.quantize=nf4", "model.dtype=bfloat16",
                             "parallel.strategy=none", "lora.r=4", "lora.target_modules=[q_proj,v_proj]"])
    model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0).model
    base = load_file(str(path / "model.safetensors"))
    quantized = {n for n, p in model.named_parameters() if is_quantized(p)}
    assert quantized == {n for n in base if n.endswith(".weight") and n.split(".")[-2] in QUANTIZED}
    for name in quantized:  # the whole weight quantized in one piece, as torchao does
        w = model.get_parameter(name)
        ref = to_nf4(base[name].to(torch.bfloat16))
        assert torch.equal(w.quantized_data, ref.quantized_data), name
        assert torch.equal(dequantize(w), ref.get_original_weight()), name
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in quantized)


def test_a_mamba_mixers_weights_its_code_reads_stay_in_model_dtype_and_jamba_runs(tmp_path):
    """Jamba multiplies by ``dt_proj.weight`` itself (no call of the layer): quantized, its first forward failed
    in NF4Tensor's dispatch. Such weights (:func:`lora_dist.lora.read_by_weight`) stay plain; the others are NF4."""
    import transformers as tf

    from lora_dist.model import load_model

    config = tf.JambaConfig(vocab_size=256, hidden_size=512, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, expert_layer_offset=1, num_experts=1, mamba_d_state=16,
                            mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "jamba")
    cfg = load_config(None, [f"model.path={tmp_path / 'jamba'}", "model.quantize=nf4", "parallel.strategy=none",
                             "lora.target_modules=[q_proj]"])
    model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0).model
    quantized = {n for n, p in model.named_parameters() if is_quantized(p)}
    assert not any(".dt_proj." in n for n in quantized)
    assert any(".in_proj." in n for n in quantized) and any(".q_proj." in n for n in quantized)
    logits = model(input_ids=torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_falcons_plain_projections_are_quantized_adapted_or_not(tmp_path):
    """``FalconLinear`` (``x @ W.T + b``), which LoRA adapts as a plain projection, was left in model.dtype unless
    adapted, and not reported: its weights are NF4 too, and the layer computes what it computed."""
    import transformers as tf

    from lora_dist.model import load_model

    config = tf.FalconConfig(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                             new_decoder_architecture=False, alibi=False)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "falcon")
    cfg = load_config(None, [f"model.path={tmp_path / 'falcon'}", "model.quantize=nf4", "parallel.strategy=none",
                             "lora.target_modules=[query_key_value]"])
    model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0).model
    quantized = {n.split(".")[-2] for n, p in model.named_parameters() if is_quantized(p)}
    assert quantized == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    layer = model.get_submodule("transformer.h.0.mlp.dense_h_to_4h")
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ dequantize(layer.weight).T.float() + (0 if layer.bias is None else layer.bias))


def test_quantized_embeddings_give_the_logits_of_their_dequantized_values(tiny_checkpoint):
    """model.quantize_embeddings: the embedding and the head are NF4 too, and the model computes exactly what
    the same model with those two replaced by their dequantized values computes."""
    from lora_dist.model import load_model

    path = tiny_checkpoint("llama", **PADDED)
    common = [f"model.path={path}", "model.quantize=nf4", "model.dtype=bfloat16", "parallel.strategy=none",
              "lora.r=4", "lora.target_modules=[q_proj,v_proj]"]

    def load(*extra):
        cfg = load_config(None, [*common, *extra])
        return load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0).model

    quantized, plain = load("model.quantize_embeddings=true"), load()
    names = {n for n, p in quantized.named_parameters() if is_quantized(p)}
    assert names == {n for n, p in plain.named_parameters() if is_quantized(p)} | {
        "model.embed_tokens.weight", "lm_head.weight"}
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            deq = dequantize(quantized.get_parameter(name))
            assert not torch.equal(deq, plain.get_parameter(name))
            plain.get_parameter(name).copy_(deq)
        ids = torch.randint(0, quantized.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(quantized(ids).logits, plain(ids).logits)


def test_a_tied_head_shares_the_nf4_embedding(tiny_checkpoint):
    """GPT-2 ties its output head to the embedding: with model.quantize_embeddings both hold the one NF4 weight,
    and the logits are those of the model with that weight dequantized."""
    from lora_dist.model import load_model

    path = tiny_checkpoint("gpt2", hidden=256, vocab=512)
    common = [f"model.path={path}", "model.quantize=nf4", "parallel.strategy=none", "lora.r=4",
              "lora.target_modules=[c_attn]"]

    def load(*extra):
        cfg = load_config(None, [*common, *extra])
        return load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0).model

    quantized, plain = load("model.quantize_embeddings=true"), load()
    assert quantized.lm_head.weight is quantized.transformer.wte.weight
    assert {n for n, p in quantized.named_parameters() if is_quantized(p)} == {"transformer.wte.weight"}
    with torch.no_grad():
        plain.transformer.wte.weight.copy_(dequantize(quantized.transformer.wte.weight))
        assert plain.lm_head.weight is plain.transformer.wte.weight
        ids = torch.randint(0, 489, (2, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(quantized.eval()(ids).logits, plain.eval()(ids).logits)  # eval: GPT-2 has dropout


class _ScaledEmbedding(torch.nn.Embedding):
    """An embedding with its own forward, as Gemma's (it scales the rows)."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


class _TiedToy(torch.nn.Module):
    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.embed, self.layers = embedding, torch.nn.ModuleList([torch.nn.Linear(128, 128)])
        self.head = torch.nn.Linear(128, 512, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


# (classes and widths, not modules: tensors made at collection would stay alive in every later test of the worker,
# and tests/test_plan.py counts live tensor bytes)
@pytest.mark.parametrize("cls,width,quantized", [
    (torch.nn.Embedding, 128, {"embed.weight", "layers.0.weight"}),
    (_ScaledEmbedding, 128, {"layers.0.weight"}),  # its forward would call F.embedding on NF4
    (torch.nn.Embedding, 96, {"layers.0.weight"}),  # rows not whole 64-element blocks
], ids=["plain", "own-forward", "odd-width"])
def test_a_tied_embedding_is_quantized_only_where_every_holder_computes_with_nf4(cls, width, quantized):
    from lora_dist.quant import prepare_quantized

    with torch.device("meta"):
        model = _TiedToy(cls(512, width))
    model.layers[0].weight = torch.nn.Parameter(torch.empty(128, 128, device="meta"))  # 16384: one whole group
    prepare_quantized(model, "nf4", 1, torch.device("cpu"), embeddings=True)
    assert {n for n, p in model.named_parameters() if is_quantized(p)} == quantized
    assert model.head.weight is model.embed.weight
    assert set(model._ddp_params_and_buffers_to_ignore) == quantized  # the names DDP knows them by


# ----------------------------------------------------------------------------- memory: measured and planned


def _measure(path: str, strategy: str, world: int, overrides: list[str], step: bool = True):
    """``(plan, base bytes at rest, peak live tensor bytes of a step)`` of load_model + the engine (no step and a
    peak of None with ``step=False``); ``world > 1`` is a fake process group (collectives are no-ops; the buffers
    are real)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lora_dist.lora import lora_parameters
    from lora_dist.model import load_model
    from lora_dist.plan import plan_memory
    from lora_dist.session import make_engine

    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.path={path}", f"parallel.strategy={strategy}", "lora.r=8",
                             "lora.target_modules=all-linear", "train.micro_batch_size=2", "train.seq_len=64",
                             *overrides])
    if world > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    elif strategy != "none":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0).model
        lora = {id(p) for p in lora_parameters(model)}
        at_rest = {"blocks": 0, "other": 0}  # the block linears' weights, everything else of the base
        for name, p in model.named_parameters():
            if id(p) not in lora:
                local = p.to_local() if hasattr(p, "to_local") else p
                size = _inner_bytes(local) if is_quantized(p) else local.numel() * local.element_size()
                at_rest["blocks" if name.split(".")[-2] in QUANTIZED else "other"] += size
        peak = None
        if step:
            optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
            engine = make_engine(model, optimizer, cfg.parallel, cfg.train, torch.device("cpu"))
            ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
            peak = step_peak(engine, ids)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return plan_memory(cfg, world), at_rest, peak


def _measure_nf4_and_bf16(path: str, strategy: str, world: int, nf4: list[str], bf16: list[str]):
    """The NF4 base's :func:`_measure`, then the bf16 base's at rest (only its bytes are compared), one after the
    other in one fresh process: the NF4 model and its step are gone before the bf16 one loads."""
    return _measure(path, strategy, world, nf4), _measure(path, strategy, world, bf16, step=False)


def _measured(*args):
    return in_fresh_process(_measure_nf4_and_bf16, *args)


@pytest.mark.slow  # two model loads and a step per case, in a fresh process
@pytest.mark.parametrize("strategy,world,extra,embeddings,vocab,hidden", [
    ("none", 1, [], False, 512, 256),
    ("fsdp2", 2, [], False, 512, 256),
    ("fsdp2", 4, ["parallel.dp_replicate=2"], False, 512, 256),  # hybrid: the base sharded over 2, replicated twice
    ("fsdp2", 2, [], True, 512, 256),
    ("none", 1, [], True, 512, 256),
    # the head's dequantized rows (the loss) outweigh the blocks backward gathers, as on the bench's models
    ("fsdp2", 2, [], True, 8192, 256),
    # NF4 units reshard fully, the others (norms; the embedding) keep a 2-rank shard (parallelize.unit_reshard);
    # 512 wide, so that every weight's quarter is whole NF4 groups, as at 256 over 2
    ("fsdp2", 4, ["parallel.reshard_after_forward=2", "parallel.shard_unit=weight"], False, 512, 512),
], ids=["none-1", "fsdp2-2", "hybrid-2x2", "fsdp2-2-embeddings", "none-1-embeddings", "fsdp2-2-embeddings-8k-vocab",
        "fsdp2-4-reshard-to-2"])
def test_nf4_base_bytes_and_the_planner_against_measured(tiny_checkpoint, strategy, world, extra, embeddings, vocab,
                                                         hidden):
    """The NF4 base at rest is what the planner counts, well under a third of the bf16 base's blocks (and, with
    model.quantize_embeddings, of the whole base), and the planner's peak is within 15% of the live tensor bytes
    of a step."""
    path = str(tiny_checkpoint("llama", hidden=hidden, layers=4, vocab=vocab))
    nf4_extra = ["model.quantize_embeddings=true"] if embeddings else []
    (nf4_plan, nf4_rest, nf4_peak), (bf16_plan, bf16_rest, _) = _measured(
        path, strategy, world, ["model.dtype=bfloat16", "model.quantize=nf4", *extra, *nf4_extra],
        ["model.dtype=bfloat16", *extra])
    assert nf4_plan.base_shard == sum(nf4_rest.values()) and bf16_plan.base_shard == sum(bf16_rest.values())
    if embeddings:  # the embedding and head at 0.28x; the norms stay bf16
        assert sum(nf4_rest.values()) < 0.3 * sum(bf16_rest.values())
    else:
        assert nf4_rest["other"] == bf16_rest["other"]  # embeddings, head, norms: not quantized (QLoRA)
    assert nf4_rest["blocks"] < 0.3 * bf16_rest["blocks"]
    print(f"{strategy} W={world}: base bytes/rank nf4 {nf4_rest} bf16 {bf16_rest}; peak planned "
          f"{nf4_plan.total} measured {nf4_peak}")
    assert abs(nf4_plan.total / nf4_peak - 1) < 0.15, (nf4_plan.as_dict(), nf4_peak)


# ----------------------------------------------------------------------------- 2 ranks == 1 process (torchrun)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    from lora_dist.demo import write_demo_data

    base = tiny_checkpoint("llama", **SIZES)
    root = tmp_path_factory.mktemp("nf4")
    data = write_demo_data(root / "data.jsonl", n=200)
    return {"base": base, "root": root, "common": short_run_args(base, data, STEPS, LR)}


def _train(setup, name: str, nproc: int, *overrides: str) -> Path:
    return train_run(setup["root"] / name, nproc, *setup["common"], *overrides)


@pytest.fixture(scope="module")
def reference(setup):
    return _train(setup, "ref", 1, "parallel.strategy=none", "train.micro_batch_size=4", "model.quantize=nf4")


@pytest.mark.dist
@pytest.mark.parametrize("strategy,extra", [
    ("fsdp2", ()),
    ("ddp", ()),
    ("ddp", ("parallel.shard_optimizer=false",)),
    ("fsdp2", ("parallel.cpu_offload=true", "parallel.activation_checkpointing=true")),
    ("fsdp2", ("parallel.shard_unit=weight", "parallel.activation_checkpointing=true",
               "parallel.offload_activations=true")),
])
def test_two_ranks_equal_one_process(setup, reference, strategy, extra):
    """2 ranks train the adapter one process trains: fsdp2 (NF4 shards all-gathered; also offloaded to host memory,
    with activation checkpointing; also one unit per NF4 weight, the checkpointed inputs in host memory), ddp with
    ZeRO-1 over the LoRA and with DDP's own wrapper."""

    out = _train(setup, f"nf4-{strategy}-{len(extra)}", 2, f"parallel.strategy={strategy}",
                 "train.micro_batch_size=2", "model.quantize=nf4", *extra)
    assert_same_run(out, reference, ADAPTER_ATOL)


@pytest.mark.dist
def test_quantized_embeddings_two_ranks_equal_one_process_and_export(setup, tiny_checkpoint, tmp_path):
    """model.quantize_embeddings: fsdp2 on 2 ranks (each quantizing its rows of the embedding and the head, the
    loss on its head rows) trains the adapter one process trains; the losses are not those of an NF4 base with
    a bf16 embedding and head; the merged export holds the dequantized embedding and head, and verifies."""
    from distutil import lora_dist
    from safetensors.torch import load_file

    from lora_dist.export import verify_checkpoint

    padded = tiny_checkpoint("llama", **PADDED)
    flags = (f"model.path={padded}", "model.quantize=nf4")
    one = _train(setup, "nf4-emb-ref", 1, "parallel.strategy=none", "train.micro_batch_size=4", *flags,
                 "model.quantize_embeddings=true")
    two = _train(setup, "nf4-emb-fsdp2", 2, "parallel.strategy=fsdp2", "train.micro_batch_size=2", *flags,
                 "model.quantize_embeddings=true")
    assert_same_run(two, one, ADAPTER_ATOL)
    bf16_embeddings = _train(setup, "nf4-padded-ref", 1, "parallel.strategy=none", "train.micro_batch_size=4",
                             *flags)
    assert logged(one) != pytest.approx(logged(bf16_embeddings), abs=1e-5)

    out = tmp_path / "merged"
    lora_dist("export", str(two), "--out", str(out), "--dtype", "float32")
    merged, base = load_file(str(out / "model.safetensors")), load_file(str(padded / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[name], dequantize(quantize_whole(base[name]))), name
        torch.testing.assert_close(merged[name], to_nf4(base[name]).get_original_weight(), rtol=0, atol=1e-7)
    report = verify_checkpoint(out, padded, two / "adapter", sample=None)
    assert len(report.recomputed) == 3 * SIZES["layers"]


@pytest.mark.dist
def test_hybrid_sharding_of_an_nf4_base_equals_one_process(setup, reference):
    """4 ranks as 2 replica groups x 2 shards: each group quantizes the base over its own 2 shards, the LoRA
    gradients are reduced across all 4, and the adapter is the one process's."""

    out = _train(setup, "nf4-hybrid", 4, "parallel.strategy=fsdp2", "parallel.dp_replicate=2",
                 "parallel.dp_shard=2", "train.micro_batch_size=1", "model.quantize=nf4")
    assert_same_run(out, reference, ADAPTER_ATOL)


@pytest.mark.dist
def test_reshard_to_fewer_ranks_after_forward_with_an_nf4_base_equals_one_process(wide):
    """``reshard_after_forward=2`` over 4 shard ranks (``node`` on 2 nodes of 2): FSDP2 cannot keep an NF4 weight
    on 2 ranks, so the units holding one reshard fully (before, the first forward failed: "Expected 1
    all_gather_output, got 3"), the others keep their 2-rank shard. The runs are the same 4 ranks' run resharded
    fully, and that one is the one process's."""
    common = ("parallel.strategy=fsdp2", "train.micro_batch_size=1", "model.quantize=nf4")
    full = _train(wide, "nf4-reshard-full", 4, *common)
    # 2 blocks of 7 NF4 weights: per block, both blocks reshard fully; per weight, the 14 weights' units, and the
    # blocks' own units (the norms) keep their 2-rank shard, as the bf16 embedding does
    for unit, fully in (("block", 2), ("weight", 14)):
        out = wide["root"] / f"nf4-reshard-2-{unit}"
        launch = ranks(4, "-m", "lora_dist.cli", "train", *wide["common"], *common, "parallel.reshard_after_forward=2",
                       f"parallel.shard_unit={unit}", f"output.dir={out}")
        assert f" {fully} FSDP2 units holding NF4 weights reshard fully" in launch.stdout + launch.stderr
        assert_same_run(out, full, ADAPTER_ATOL / 10)
    # Each rank quantizes its own rows, with its own scales: 4 ranks' NF4 base is within rounding of the one
    # process's, and after Adam's normalization their adapters are 3.1e-5 apart here (measured), against 1.5e-4,
    # where a missed reduction or a wrong shard moves elements by ~lr = 5e-3 per step.
    assert_same_run(full, wide["reference"], 3 * ADAPTER_ATOL)


@pytest.fixture(scope="module")
def wide(tiny_checkpoint, tmp_path_factory):
    """A 512-wide model, whose weights' quarters are whole NF4 groups (256 wide, k/v_proj's are not, and stay
    bf16 over 4 ranks), and its one-process NF4 run."""
    from lora_dist.demo import write_demo_data

    base = tiny_checkpoint("llama", hidden=512, layers=2)
    root = tmp_path_factory.mktemp("nf4-wide")
    data = write_demo_data(root / "data.jsonl", n=200)
    setup = {"base": base, "root": root, "common": short_run_args(base, data, STEPS, LR)}
    setup["reference"] = _train(setup, "ref", 1, "parallel.strategy=none", "train.micro_batch_size=4",
                                "model.quantize=nf4")
    return setup


@pytest.mark.dist
@pytest.mark.parametrize("nproc,extra", [
    (1, ()),
    (2, ("parallel.dp_replicate=2", "parallel.dp_shard=1")),
])
def test_fsdp2_over_one_shard_rank_equals_one_process(setup, reference, nproc, extra):
    """fsdp2 with the base sharded over one rank (one GPU; replica groups of one rank each) runs as none / ddp
    (lora_dist.parallel.replicated_if_unsharded) and trains the one process's adapter."""

    out = _train(setup, f"nf4-one-shard-{nproc}", nproc, "parallel.strategy=fsdp2",
                 f"train.micro_batch_size={4 // nproc}", "model.quantize=nf4", *extra)
    assert_same_run(out, reference, ADAPTER_ATOL)


@pytest.mark.dist
def test_fsdp2_casting_to_bf16_over_one_shard_rank_trains(setup, reference):
    """fsdp2 that stays FSDP2 over one rank (its bf16 cast): FSDP2 rebuilds an unsharded param from one
    all-gather input there, not NF4's three, so the NF4 weights stay out of FSDP2, whole. bf16 compute: the
    fp32 one process's losses within 1%, not its adapter."""
    out = _train(setup, "nf4-one-shard-bf16", 1, "parallel.strategy=fsdp2", "train.micro_batch_size=4",
                 "model.quantize=nf4", "parallel.mixed_precision=bfloat16")
    assert logged(out) == pytest.approx(logged(reference), rel=1e-2)
    assert logged(out) != logged(reference)  # computed in bf16: not the fp32 run's numbers


def test_cpu_offload_of_an_nf4_base_over_one_shard_rank_is_refused(tiny_checkpoint):
    from lora_dist.model import load_model

    cfg = load_config(None, [f"model.path={tiny_checkpoint('llama', **SIZES)}", "model.quantize=nf4",
                             "parallel.strategy=fsdp2", "parallel.cpu_offload=true"])
    with pytest.raises(ConfigError, match=r"needs the base sharded over 2 or more ranks") as e:
        load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0)
    assert "\n" not in str(e.value)


@pytest.mark.dist
def test_nf4_changes_the_numbers(setup, reference):
    """The reference really trained on the NF4 base: the unquantized base gives other losses."""
    plain = _train(setup, "plain", 1, "parallel.strategy=none", "train.micro_batch_size=4")
    assert logged(plain) != pytest.approx(logged(reference), abs=1e-5)
    assert logged(plain) == pytest.approx(logged(reference), rel=1e-2)


@pytest.mark.dist
def test_each_rank_quantizes_its_rows_and_the_export_merges_into_the_dequantized_base(setup, tmp_path):
    """fsdp2 on 2 ranks: each rank's NF4 shard is its chunk of the weight quantized whole; the merged export
    (fp32) is an fp32 merge into the dequantized weights, every other quantized weight dequantized, the rest
    the checkpoint's."""
    from distutil import ranks
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lora_dist.merge import LoRAWeights, lora_scale, merge_weight

    ranks(2, str(Path(__file__).resolve()), str(setup["base"]), str(tmp_path))
    base = load_file(str(Path(setup["base"]) / "model.safetensors"))
    for rank in (0, 1):
        shards = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(shards) == {n for n in base if n.split(".")[-2] in QUANTIZED}
        for name, (data, deq) in shards.items():
            whole = to_nf4(base[name].to(torch.bfloat16))
            rows = whole.shape[0] // 2
            assert torch.equal(data, whole.quantized_data.view(2, -1)[rank]), name
            assert torch.equal(deq, whole.get_original_weight()[rank * rows:(rank + 1) * rows]), name
    lora = load_file(str(tmp_path / "lora.safetensors"))
    merged_dir = tmp_path / "merged"
    merged = {}
    for f in merged_dir.glob("*.safetensors"):
        merged.update(load_file(str(f)))
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata()["lora_dist_quantized_base"] == "nf4"
    assert set(merged) == set(base)
    adapted = 0
    for name, tensor in merged.items():
        module, kind = name.rsplit(".", 1)[0], name.split(".")[-2]
        if kind not in QUANTIZED:
            assert torch.equal(tensor, base[name]), name  # read from the checkpoint, as without nf4
            continue
        deq = to_nf4(base[name].to(torch.bfloat16)).get_original_weight().float()
        if f"{module}.lora_A.weight" in lora:
            adapted += 1
            weights = LoRAWeights(lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"], lora_scale(4, 8.0))
            ref = merge_weight(deq, weights, out_dtype=torch.float32, name=name)
            assert not torch.equal(ref, deq)
            torch.testing.assert_close(tensor, ref, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(tensor, deq), name
    assert adapted == 2 * SIZES["layers"]

    # verify knows the export is of an NF4 run: it compares with the dequantized base, every tensor recomputed
    from lora_dist.export import verify_checkpoint
    from lora_dist.export.verify import check_untouched
    from lora_dist.model_dir import ModelDir

    report = verify_checkpoint(merged_dir, setup["base"], tmp_path / "adapter", sample=None)
    assert len(report.recomputed) == 2 * SIZES["layers"]
    untouched_quantized = [k for k in base if k.split(".")[-2] in ("k_proj", "o_proj", "down_proj")]
    problems, _ = check_untouched(ModelDir(merged_dir), ModelDir(setup["base"]), untouched_quantized)
    assert len(problems) == len(untouched_quantized)  # against the original weights they differ


def _dist_main(base: str, out: str) -> None:
    """Under torchrun (2 ranks): load fsdp2 + NF4, save each rank's NF4 shards, give B values, export merged."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from lora_dist.export import export_merged
    from lora_dist.lora import lora_modules
    from lora_dist.model import load_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, [f"model.path={base}", "model.quantize=nf4", "model.dtype=bfloat16",
                             "parallel.strategy=fsdp2", "lora.r=4", "lora.alpha=8",
                             "lora.target_modules=[q_proj,v_proj]"])
    model = load_model(cfg.model, cfg.lora, cfg.parallel, torch.device("cpu"), 0).model
    shards = {}
    for name, p in model.named_parameters():
        if is_quantized(p):
            local = p.to_local()
            shards[name] = (local.quantized_data.clone(), dequantize(local).clone())
    torch.save(shards, Path(out) / f"rank{rank}.pt")
    lora = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(lora_modules(model)):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape,
                                                  generator=torch.Generator().manual_seed(i)) * 0.05)
            lora[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach().clone()
            lora[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach().clone()
    if rank == 0:
        from lora_dist.adapter import save_adapter

        save_file(lora, str(Path(out) / "lora.safetensors"))
        save_adapter(model, Path(out) / "adapter", base)
    export_merged(model, Path(out) / "merged", base, dtype=torch.float32)
    dist.destroy_process_group()


if __name__ == "__main__":
    _dist_main(sys.argv[1], sys.argv[2])


@pytest.mark.dist
def test_export_on_other_ranks_merges_into_the_base_the_run_trained_on(setup, tiny_checkpoint, tmp_path):
    """Which weights are NF4 depends on the sharding (rows split into whole NF4 groups per rank). The adapter records
    the run's: a 2-rank fsdp2 run (its 128 x 128 q_proj one NF4 group, not split in two) exported on 1 process
    stores exactly those as NF4 and merges q_proj into the original weights; a 1-process run (q_proj and o_proj NF4)
    exported on 2 ranks, which cannot split them, is refused in one line before anything is written."""
    from distutil import lora_dist, ranks
    from safetensors import safe_open

    from lora_dist.adapter import adapter_nf4_record
    from lora_dist.export import verify_checkpoint

    def recorded(adapter: Path) -> set[str]:
        return set(adapter_nf4_record(adapter).weights)

    base = tiny_checkpoint("llama", hidden=128, layers=2)
    flags = (f"model.path={base}", "model.quantize=nf4")
    one = _train(setup, "nf4-export-one", 1, "parallel.strategy=none", "train.micro_batch_size=4", *flags)
    two = _train(setup, "nf4-export-two", 2, "parallel.strategy=fsdp2", "train.micro_batch_size=2", *flags)
    one_process, two_ranks = recorded(one / "adapter"), recorded(two / "adapter")
    assert two_ranks < one_process and "model.layers.0.self_attn.q_proj.weight" in one_process - two_ranks
    out = tmp_path / "merged"
    lora_dist("export", str(two), "--out", str(out), "--dtype", "float32")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert set(fh.metadata()["lora_dist_quantized_weights"].split(",")) == two_ranks
    verify_checkpoint(out, base, two / "adapter", sample=None)

    # lora-dist eval likewise: on 1 process, the loss of the base the 2 ranks trained on, as they measure it.
    def evaluated(nproc: int, strategy: str) -> float:
        argv = ["-m", "lora_dist.cli", "eval", *setup["common"], *flags, f"output.dir={two}",
                "data.eval_fraction=0.25", f"parallel.strategy={strategy}", "--json"]
        proc = ranks(nproc, *argv) if nproc > 1 else lora_dist(*argv[2:])
        return json.loads(proc.stdout.strip().splitlines()[-1])["loss"]

    on_two = evaluated(2, "fsdp2")
    assert evaluated(1, "none") == pytest.approx(on_two, rel=1e-5)

    proc = ranks(2, "-m", "lora_dist.cli", "export", str(one), "--out", str(tmp_path / "refused"), check=False)
    assert proc.returncode != 0 and not (tmp_path / "refused").exists()
    assert "error: the run stored model.layers.0.self_attn.o_proj.weight as NF4 with its rows split over 1 rank(s); " \
           "split over 2 here they are not whole 16384-element NF4 groups: export it on 1 process" in proc.stderr, \
           proc.stderr[-3000:]


@pytest.mark.dist
def test_resume_where_the_sharding_stores_other_nf4_weights_is_refused(setup, tiny_checkpoint, tmp_path):
    """A checkpoint records its NF4 weights: resumed by one process, which would store q_proj and o_proj as NF4 where
    the 2 ranks that trained kept them unquantized, or without model.quantize, the run stops in one line, before
    loading anything; resumed on 2 ranks it goes on. Exported before it finished (checkpoints, no adapter yet), on
    1 process, the merge is into the base those 2 ranks trained on."""
    from distutil import lora_dist
    from safetensors import safe_open

    base = tiny_checkpoint("llama", hidden=128, layers=2)
    flags = (f"model.path={base}", "model.quantize=nf4", "checkpoint.every=2", "parallel.strategy=fsdp2")
    run = _train(setup, "nf4-resume", 2, "train.micro_batch_size=2", "train.run_steps=2", *flags)
    state = json.loads((run / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["quantized"] and not any("q_proj" in n for n in state["quantized"]) and state["quantized_shards"] == 2
    assert not (run / "adapter").exists()
    out = tmp_path / "merged"
    lora_dist("export", str(run), "--out", str(out), "--dtype", "float32")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata()["lora_dist_quantized_weights"].split(",") == state["quantized"]

    plain = [f for f in flags if f != "model.quantize=nf4"]
    proc = lora_dist("train", *setup["common"], "train.micro_batch_size=4", *plain, f"output.dir={run}", check=False)
    assert proc.returncode != 0
    assert 'step-000002 was trained with model.quantize=nf4, this run has model.quantize="" (no quantization)' \
        in proc.stderr, proc.stderr[-3000:]
    proc = lora_dist("train", *setup["common"], "train.micro_batch_size=4", *flags, f"output.dir={run}", check=False)
    assert proc.returncode != 0
    assert "step-000002 was trained with model.layers.0.self_attn.o_proj.weight unquantized, its base's rows split " \
           "over 2 rank(s); split over 1 here it is stored NF4 (the NF4 weights depend on the split): resume with " \
           "the base split over 2" in proc.stderr, proc.stderr[-3000:]
    _train(setup, "nf4-resume", 2, "train.micro_batch_size=2", *flags)
    assert len(logged(run)) == STEPS


@pytest.mark.dist
def test_lora_dist_export_of_a_one_process_run_merges_into_the_dequantized_base(setup, reference, tmp_path):
    """`lora-dist export RUN_DIR` as one process loads the NF4 model (not the offline merge of the original
    weights): verify recomputes every merged tensor from the dequantized base."""
    from distutil import lora_dist
    from safetensors import safe_open

    from lora_dist.export import verify_checkpoint

    out = tmp_path / "merged"
    lora_dist("export", str(reference), "--out", str(out), "--dtype", "float32")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata()["lora_dist_quantized_base"] == "nf4"
    report = verify_checkpoint(out, setup["base"], reference / "adapter", sample=None)
    assert len(report.recomputed) == 3 * SIZES["layers"]


@pytest.mark.parametrize("arch,language_model", [("gemma3", "model.language_model."), ("llama4", "language_model.")])
def test_a_vision_towers_weights_are_not_quantized(arch, language_model, tiny_checkpoint):
    """A vision-language model trains its language model on text: only that is stored as NF4; the vision tower,
    which never runs, stays as stored and is exported untouched."""
    from lora_dist.model_dir import ModelDir, model_class
    from lora_dist.quant import quantized_weights

    path = tiny_checkpoint(arch)
    model = model_class(ModelDir(path).hf_config).from_pretrained(path, dtype=torch.float32)
    names = {id(m): n for n, m in model.named_modules()}
    chosen = [names[id(m)] for m, _ in quantized_weights(model, embeddings=True)]
    assert chosen and all(n.startswith(language_model) for n in chosen)
    assert any(type(m) is torch.nn.Linear for n, m in model.named_modules() if not n.startswith(language_model)
               and "vision" in n)
