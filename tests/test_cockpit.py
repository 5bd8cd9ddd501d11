"""The user's cockpit: ``lora-dist plot`` (PNGs from metrics.jsonl) and ``lora-dist generate``.

``generate`` is checked against the merged checkpoint and against PEFT: greedy
decoding of base + adapter gives the same tokens as the checkpoint merged from
them, and as PEFT's model with the same adapter.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from distutil import lora_dist
from lora_dist.generate import GenerateError, generate, load_messages
from lora_dist.plot import FIGURES, PlotError, plot_run, read_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def _write_metrics(run, rows, tail: str = "") -> None:
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _row(step: int, loss: float | None = 2.0) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "grad_norm": 1.0, "tokens_per_s": 100.0 + step,
            "step_time_s": 0.1, "memory_gb": 0.5}


# ----------------------------------------------------------------------------- plot


def test_curves_keep_the_last_row_of_a_step_and_skip_nulls_and_torn_lines(tmp_path):
    rows = [_row(1, 3.0), _row(2, None), _row(3, 2.5), {"step": 3, "eval_loss": 2.7},
            _row(2, 2.9)]  # a resumed run logs step 2 again
    _write_metrics(tmp_path, rows, tail='{"step": 4, "loss": 1.')  # torn by a kill
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert curves.series("loss") == ([1, 2, 3], [3.0, 2.9, 2.5])
    assert curves.series("eval_loss") == ([3], [2.7])
    assert curves.series("lr")[0] == [1, 2, 3]


def test_plot_writes_one_png_per_figure_next_to_the_run(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, [_row(s, 3.0 - 0.1 * s) for s in range(1, 6)] + [{"step": 5, "eval_loss": 2.8}])
    written = plot_run(run)
    assert sorted(p.name for p in written) == sorted(FIGURES)
    for path in written:
        assert path.parent == run / "plots"
        width, height = _png_size(path)
        assert width > 100 and height > 100
    assert not [p for p in (run / "plots").iterdir() if p.name.startswith(".")]  # no temp files left


def test_plot_skips_a_figure_the_run_never_logged(tmp_path):
    _write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert [p.name for p in plot_run(tmp_path, tmp_path / "out")] == ["loss.png"]


@pytest.mark.parametrize("content", [None, "", "not json\n", '{"step": 1, "loss": null}\n'])
def test_plot_of_a_run_without_metrics_is_one_line(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(PlotError, match="metrics"):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_plot_cli(tmp_path):
    _write_metrics(tmp_path, [_row(1), _row(2)])
    r = lora_dist("plot", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plots" / "loss.png").is_file()
    r = lora_dist("plot", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "metrics.jsonl not found" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """(base, adapter, merged): an adapter with non-zero B on every attention projection, and its merge."""
    from transformers import AutoModelForCausalLM

    from lora_dist import LoRAConfig, inject_lora, save_adapter
    from lora_dist.lora import lora_modules
    from lora_dist.export import merge_offline

    base = tiny_checkpoint("llama", seed=3)
    tmp = tmp_path_factory.mktemp("generate")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=generator) * 0.5)
    save_adapter(model, tmp / "adapter", str(base))
    merge_offline(base, tmp / "adapter", tmp / "merged")
    return base, tmp / "adapter", tmp / "merged"


PROMPT = "the model reads"


def test_greedy_base_with_adapter_equals_the_merged_checkpoint_and_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, merged = trained
    with_adapter = generate(base, adapter, prompt=PROMPT, max_new_tokens=12, chat_template="none")
    from_merged = generate(merged, prompt=PROMPT, max_new_tokens=12, chat_template="none")
    plain = generate(base, prompt=PROMPT, max_new_tokens=12, chat_template="none")
    assert len(with_adapter.new_tokens) == 12
    assert with_adapter.new_tokens == from_merged.new_tokens
    assert with_adapter.text == from_merged.text
    assert with_adapter.new_tokens != plain.new_tokens  # the adapter changes the model

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           adapter).eval()
    from lora_dist.data import load_tokenizer

    ids = torch.tensor([load_tokenizer(base)(PROMPT)["input_ids"]])
    out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, pad_token_id=0)
    assert out[0, ids.shape[1]:].tolist() == with_adapter.new_tokens


def test_prompt_goes_through_the_chat_template(trained):
    base, adapter, _ = trained
    result = generate(base, adapter, prompt="hello there", max_new_tokens=2, chat_template="chatml")
    assert result.prompt == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert generate(base, adapter, messages=messages, max_new_tokens=2,
                    chat_template="chatml").prompt.startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_sampling_is_seeded(trained):
    base, adapter, _ = trained
    runs = [generate(base, adapter, prompt=PROMPT, max_new_tokens=16, temperature=1.5, seed=s,
                     chat_template="none").new_tokens for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_messages_file(tmp_path):
    conversation = [{"role": "user", "content": "hi"}]
    (tmp_path / "a.json").write_text(json.dumps(conversation))
    (tmp_path / "b.json").write_text(json.dumps({"messages": conversation}))
    assert load_messages(tmp_path / "a.json") == load_messages(tmp_path / "b.json") == conversation
    (tmp_path / "c.json").write_text('[{"role": "user"}]')
    with pytest.raises(GenerateError, match="role.*content"):
        load_messages(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{oops")
    with pytest.raises(GenerateError, match="not JSON"):
        load_messages(tmp_path / "d.json")


def test_messages_without_a_template_are_refused(trained):
    base, _, _ = trained  # the tiny tokenizer has no chat template of its own
    with pytest.raises(GenerateError, match="--chat-template"):
        generate(base, messages=[{"role": "user", "content": "hi"}], max_new_tokens=1)


def test_generate_cli(trained, tmp_path):
    base, adapter, merged = trained
    args = ["--prompt", PROMPT, "--max-new-tokens", "8", "--chat-template", "none"]
    r1 = lora_dist("generate", "--base", str(base), "--adapter", str(adapter), *args)
    r2 = lora_dist("generate", *args, "--base", str(merged))
    assert r1.returncode == 0 == r2.returncode, r1.stderr + r2.stderr
    assert r1.stdout == r2.stdout and r1.stdout.strip()
    r = lora_dist("generate", "--base", str(tmp_path), "--prompt", "x", check=False)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = lora_dist("generate", "--base", str(base), "--prompt", "x", "--max-new-tokens", "0", check=False)
    assert r.returncode == 2 and "--max-new-tokens" in r.stderr
