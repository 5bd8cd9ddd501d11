"""Tiny Hugging Face checkpoints and data for the demo, tests and benchmarks; the demo itself.

No model hub is needed: models are built from a config with random weights,
saved with ``save_pretrained`` (safetensors) next to a byte-level BPE
tokenizer trained on the demo text, and then loaded like any real checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lora_dist.errors import UserError

__all__ = [
    "ARCHS",
    "HUB_ARCHS",
    "VLM_ARCHS",
    "DemoFailed",
    "check_demo",
    "demo_texts",
    "make_tiny_checkpoint",
    "make_tokenizer",
    "run_demo",
    "write_demo_data",
]

ARCHS = ("llama", "qwen2", "mistral", "gpt2", "bert", "mixtral", "qwen3_moe")
#: More of the Hub's decoder families, each with something the ones above lack: QK norms (qwen3), tied and scaled
#: embeddings with sliding-window layers (gemma3_text), fused qkv and gate-up projections (phi3), latent attention
#: with a dense first layer, shared experts and a router (deepseek_v3), biased experts and attention sinks
#: (gpt_oss), linear-attention layers and a hidden->1 shared-expert gate (qwen3_next), a shared expert whose MLP
#: PEFT reads as trained (qwen2_moe; lora_dist.adapter.peft_misread).
HUB_ARCHS = ("qwen3", "gemma3_text", "phi3", "deepseek_v3", "gpt_oss", "qwen3_next", "qwen2_moe")
#: Vision-language checkpoints whose language model is fine-tuned on text, each with a tiny vision tower: Gemma 3
#: (``language_model.model.*`` files, sliding-window layers in ``text_config``), Qwen2.5-VL (renames transformers
#: looks up by class), Llama 4 (MoE with a router that is a ``Linear`` subclass, chunked attention).
VLM_ARCHS = ("gemma3", "qwen2_5_vl", "llama4")
#: Token ids a vision-language checkpoint reserves for images, past the tokenizer's (its vocabulary is padded).
_IMAGE_IDS = 64

#: Experts per MoE layer of the tiny MoE checkpoints, and experts each token is routed to.
MOE_EXPERTS, MOE_TOP_K = 4, 2

_SUBJECTS = ["the red fox", "a small robot", "the old sailor", "my neighbour", "the young wizard", "a grey cat",
             "the tired baker", "our teacher", "the quiet river", "a busy engineer"]
_VERBS = ["likes", "builds", "paints", "finds", "carries", "watches", "repairs", "counts", "sings about", "draws"]
_OBJECTS = ["bright lanterns", "wooden boats", "silver keys", "green apples", "tall towers", "paper birds",
            "old maps", "warm bread", "blue stones", "tiny gears"]
_PLACES = ["in the morning", "near the harbour", "after dinner", "under the bridge", "on sundays",
           "in the garden", "before the storm", "at the market", "by the window", "in the mountains"]


def demo_texts(n: int, seed: int = 0) -> list[str]:
    """Short templated sentences: varied enough to learn from, regular enough that loss drops fast."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        s = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
             for _ in range(rng.randint(2, 4))]
        texts.append(" ".join(s).capitalize())
    return texts


def write_demo_data(path: str | Path, n: int = 400, seed: int = 0, kind: str = "text") -> Path:
    """Write ``n`` demo records as .jsonl: ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for text in demo_texts(n, seed):
            if kind == "text":
                record = {"text": text}
            else:
                first, _, rest = text.partition(". ")
                record = {"prompt": first + ".", "completion": " " + rest}
            f.write(json.dumps(record) + "\n")
    return path


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the demo text, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_texts(2000, seed=1234), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def _config(arch: str, vocab: int, hidden: int, layers: int, heads: int, intermediate: int, max_pos: int):
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=heads)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        extra = {"sliding_window": None} if arch in ("mistral", "qwen2") else {}
        return cls(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=max(1, heads // 2),
                   max_position_embeddings=max_pos, tie_word_embeddings=False, **common, **extra)
    if arch == "mixtral":  # experts of width `intermediate`, saved per expert (block_sparse_moe.experts.N.w1/w2/w3)
        return tf.MixtralConfig(hidden_size=hidden, intermediate_size=intermediate,
                                num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_pos,
                                tie_word_embeddings=False, sliding_window=None, num_local_experts=MOE_EXPERTS,
                                num_experts_per_tok=MOE_TOP_K, **common)
    if arch == "qwen3_moe":  # every layer sparse (mlp.experts.N.gate_proj/up_proj/down_proj)
        return tf.Qwen3MoeConfig(hidden_size=hidden, intermediate_size=intermediate, moe_intermediate_size=intermediate,
                                 num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
                                 max_position_embeddings=max_pos, tie_word_embeddings=False, num_experts=MOE_EXPERTS,
                                 num_experts_per_tok=MOE_TOP_K, decoder_sparse_step=1, mlp_only_layers=[], **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_pos,
                             n_inner=intermediate, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    if arch == "bert":
        return tf.BertConfig(hidden_size=hidden, intermediate_size=intermediate, max_position_embeddings=max_pos,
                             **common)
    if arch in HUB_ARCHS:
        return _hub_config(arch, common, hidden, intermediate, heads, max_pos)
    if arch in VLM_ARCHS:
        return _vlm_config(arch, common, hidden, intermediate, heads, max_pos)
    raise ValueError(f"unknown demo architecture {arch!r}; choose from {ARCHS + HUB_ARCHS + VLM_ARCHS}")


def _vlm_config(arch: str, common: dict, hidden: int, intermediate: int, heads: int, max_pos: int):
    """A tiny config of one of :data:`VLM_ARCHS`: the language model at the demo's sizes, a 2-layer vision tower,
    the image token ids in the last :data:`_IMAGE_IDS` rows of the vocabulary."""
    import transformers as tf

    head_dim, image = hidden // heads, common["vocab_size"] - _IMAGE_IDS
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=max(1, heads // 2),
                head_dim=head_dim, max_position_embeddings=max_pos, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, **common)  # the token ids are the tokenizer's (make_tiny_checkpoint)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
    if arch == "gemma3":
        return tf.Gemma3Config(
            text_config={**text, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
            vision_config={**vision, "image_size": 32}, mm_tokens_per_image=4, image_token_index=image,
            boi_token_index=image + 1, eoi_token_index=image + 2)
    if arch == "qwen2_5_vl":
        half = head_dim // 2  # the rotary half split over time, height and width
        rope = {"rope_type": "default", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                "rope_theta": 10000.0}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                      window_size=32)
        return tf.Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision,
                                   image_token_id=image, video_token_id=image + 1, vision_start_token_id=image + 2,
                                   vision_end_token_id=image + 3)
    # llama4: every layer MoE, a NoPE layer, chunked attention
    text = {**text, "intermediate_size_mlp": intermediate, "num_local_experts": MOE_EXPERTS, "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1, "no_rope_layers": [1, 0], "attention_chunk_size": 16}
    vision = {**vision, "image_size": 32, "vision_output_dim": hidden, "projector_input_dim": hidden,
              "projector_output_dim": hidden, "pixel_shuffle_ratio": 0.5}
    return tf.Llama4Config(text_config=text, vision_config=vision, image_token_index=image)


def _hub_config(arch: str, common: dict, hidden: int, intermediate: int, heads: int, max_pos: int):
    """A tiny config of one of :data:`HUB_ARCHS`: the family's layout at the demo's sizes, two layers of
    different kinds where the family mixes them."""
    import transformers as tf

    head_dim = hidden // heads
    base = dict(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=max_pos, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, **common)  # the token ids are the tokenizer's (make_tiny_checkpoint)
    moe = dict(num_experts_per_tok=MOE_TOP_K, moe_intermediate_size=intermediate // 2)
    extra = {
        "qwen3": dict(head_dim=head_dim),
        "gemma3_text": dict(head_dim=head_dim, sliding_window=16, tie_word_embeddings=True,
                            layer_types=["sliding_attention", "full_attention"]),
        "phi3": dict(),
        "deepseek_v3": dict(num_key_value_heads=heads, n_routed_experts=MOE_EXPERTS, n_shared_experts=1,
                            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None,
                            kv_lora_rank=hidden // 4, qk_rope_head_dim=head_dim // 2,
                            qk_nope_head_dim=head_dim // 2, v_head_dim=head_dim,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **moe),
        "gpt_oss": dict(head_dim=head_dim, num_local_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K,
                        sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
        "qwen3_next": dict(head_dim=head_dim, num_experts=MOE_EXPERTS, shared_expert_intermediate_size=intermediate,
                           linear_num_value_heads=heads, linear_num_key_heads=max(1, heads // 2),
                           linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
                           layer_types=["linear_attention", "full_attention"], **moe),
        "qwen2_moe": dict(num_experts=MOE_EXPERTS, shared_expert_intermediate_size=intermediate, **moe),
    }[arch]
    return tf.AutoConfig.for_model(arch, **{**base, **extra})


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_pos: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    vocab: int | None = None,
) -> Path:
    """Build a randomly initialized HF model from config and save it like a real checkpoint.

    Args:
        path: output dir (config.json, model*.safetensors, tokenizer files).
        arch: one of :data:`ARCHS`, :data:`HUB_ARCHS` or :data:`VLM_ARCHS`; ``bert`` is saved as a masked-LM encoder; ``mixtral`` and
            ``qwen3_moe`` are MoE models (:data:`MOE_EXPERTS` experts, top-:data:`MOE_TOP_K`), saved
            in the Hub's per-expert layout (``save_pretrained`` converts transformers' fused experts back).
        max_shard_size: split the weights into several files (e.g. "200KB").
        vocab: the embedding's rows, padded past the tokenizer's (as many Hub models pad theirs); default the
            tokenizer's size.

    Returns:
        ``path``.
    """
    import transformers as tf

    path = Path(path)
    tokenizer = make_tokenizer()
    if vocab is not None and vocab < len(tokenizer):
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    vocab = vocab or len(tokenizer) + (_IMAGE_IDS if arch in VLM_ARCHS else 0)
    config = _config(arch, vocab, hidden, layers, heads, intermediate or 4 * hidden, max_pos)
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.bos_token_id = c.eos_token_id = tokenizer.eos_token_id
        c.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    if arch == "bert":
        model = tf.BertForMaskedLM(config)
    elif arch in VLM_ARCHS:
        model = tf.AutoModelForImageTextToText.from_config(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():  # not Module.to: it casts a complex buffer (Llama 4's rotary) to real
            tensor.data = tensor.data.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


class DemoFailed(UserError, RuntimeError):
    """The demo ran but its result is not what it promises."""


def run_demo(config: Path, out: Path, nproc: int = 2, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """The README's main job: build a tiny Llama, fine-tune it on ``nproc`` CPU processes, export and check.

    Returns the training launch's exit code if it failed, else 0 once every promise is checked.

    Raises:
        DemoFailed: the loss did not go down, or the merged export is not base + adapter.
    """
    import os
    import shutil
    import socket
    import subprocess
    import sys

    out = Path(out).resolve()
    base, data, run = out / "base", out / "data.jsonl", out / "run"
    if not (base / "config.json").is_file():
        print(f"building a tiny Llama checkpoint in {base}")
        make_tiny_checkpoint(base, arch="llama", hidden=128, layers=4, heads=4)
    write_demo_data(data, n=600)
    if run.exists():
        from lora_dist.outputs import OutputError, read_run_marker

        if read_run_marker(run) is None:  # only a run lora_dist wrote is replaced
            raise OutputError(f"{run} exists and is not a lora-dist run dir; choose another --out for the demo")
        shutil.rmtree(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "lora_dist.cli", "train", str(config),
           f"model.path={base}", f"data.path={data}", f"output.dir={run}", *overrides]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if code != 0:
        return code
    check_demo(base, run)
    return 0


def check_demo(base: Path, run: Path) -> None:
    """The demo's promises: the loss went down, and the merged export equals base + adapter.

    Raises:
        DemoFailed: naming the promise that does not hold.
    """
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapter
    from lora_dist.export import verify_checkpoint

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    if not min(losses[-3:]) < losses[0] - 0.5:
        raise DemoFailed(f"the training loss did not go down ({losses[0]:.3f} -> {losses[-1]:.3f})")
    if not (run / "merged" / "model.safetensors.index.json").is_file():
        raise DemoFailed(f"no merged export in {run / 'merged'} (export.merged was turned off?)")
    report = verify_checkpoint(run / "merged", base_dir=base, adapter_dir=run / "adapter")
    print(f"verified {report.summary()}")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    lora = load_adapter(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - lora(input_ids=ids).logits).abs().max().item()
    print(f"merged checkpoint loads with transformers; max |logits - (base + adapter) logits| = {diff:.2e}")
    if not diff < 1e-4:
        raise DemoFailed(f"the merged checkpoint's logits differ from base + adapter by {diff:.2e}")
    print(f"demo OK; outputs in {run}")
