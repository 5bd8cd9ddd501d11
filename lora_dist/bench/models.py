"""The benchmark's models and data: Llama-shaped checkpoints built from a config.

Shapes follow Llama (RMSNorm, SwiGLU MLP, grouped-query attention, untied
embeddings, the 32000-token Llama-2 vocabulary) at sizes two CPU ranks can
train in the benchmark's time budget. Weights are random (``save_pretrained``
of a model built from its config), the tokenizer is the demo's local BPE
(it uses the first few hundred ids of the vocabulary), so nothing is
downloaded. Checkpoints are cached by shape in the work dir.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["FULL_SIZES", "LARGE_SIZES", "QUICK_SIZES", "ModelSpec", "build_checkpoint", "write_data"]


@dataclass(frozen=True)
class ModelSpec:
    """A Llama shape."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000

    def num_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


#: The default sizes: ~112M and ~254M parameters, what two shared CPU cores get through, six
#: configurations each, in the 25-minute budget.
FULL_SIZES = (
    ModelSpec("llama-112m", hidden=768, layers=10, heads=12, kv_heads=4, intermediate=2048),
    ModelSpec("llama-254m", hidden=1024, layers=16, heads=16, kv_heads=8, intermediate=2816),
)
#: Larger sizes, opt-in with ``--sizes`` (each takes about three minutes per configuration here;
#: full fine-tuning of llama-440m holds about 5.5 GB per rank).
LARGE_SIZES = (ModelSpec("llama-440m", hidden=1280, layers=20, heads=20, kv_heads=4, intermediate=3584),)
#: Smoke-test size for ``--quick``.
#: The smoke-test model: every block linear's half holds whole 16,384-element NF4 groups on 2 ranks, so the
#: NF4 configuration quantizes them.
QUICK_SIZES = (ModelSpec("llama-tiny", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=2048),)


def build_checkpoint(spec: ModelSpec, root: Path) -> Path:
    """The checkpoint dir for ``spec`` under ``root``, built once (fp32 safetensors + tokenizer)."""
    import torch
    import transformers as tf

    from lora_dist.demo import make_tokenizer

    path = Path(root) / spec.name
    stamp = path / "bench_spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return path
    tokenizer = make_tokenizer()
    config = tf.LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="2GB")
    tokenizer.save_pretrained(path)
    stamp.write_text(json.dumps(asdict(spec)))
    return path


def write_data(path: Path, records: int = 2000) -> Path:
    """The training text every configuration reads (the demo's templated sentences)."""
    from lora_dist.demo import write_demo_data

    if not Path(path).is_file():
        write_demo_data(path, n=records, seed=0)
    return Path(path)
