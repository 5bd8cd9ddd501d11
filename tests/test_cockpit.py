"""The user's cockpit: ``lora-dist plot`` (PNGs from metrics.jsonl) and ``lora-dist generate``.

``generate`` is checked against the merged checkpoint and against PEFT: greedy
decoding of base + adapter gives the same tokens as the checkpoint merged from
them, and as PEFT's model with the same adapter; against transformers' ``generate``:
the same stop at the template's end-of-turn token, the same samples with the same
settings; and against training: the same template, rendered the same way.
"""

from __future__ import annotations

import json
import shutil
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


def test_plot_of_the_metrics_file_instead_of_its_run_dir_is_one_line(tmp_path, capsys):
    """``lora-dist plot RUN/metrics.jsonl`` (the file, not the run dir): exit 2, one line saying to pass the run dir
    (before: a NotADirectoryError traceback)."""
    from lora_dist.cli import EXIT_USAGE, main

    _write_metrics(tmp_path, [_row(1), _row(2)])
    assert main(["plot", str(tmp_path / "metrics.jsonl")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (f"lora-dist plot: error: {tmp_path / 'metrics.jsonl'} is a file, not a run dir; pass the "
                   "output.dir of a run (the dir that holds metrics.jsonl)\n")


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


@pytest.fixture(scope="module")
def turn_model(tmp_path_factory):
    """A chatml model that answers any prompt ending in "\\n" with "Yes<|im_end|>" and then, unless stopped, writes
    on (" more text after the turn"): blocks that add nothing and a head that maps each token to the next of that
    chain. Its generation config's EOS is the tokenizer's, not <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_dist.chat import TEMPLATES
    from lora_dist.demo import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("turns"), arch="llama", hidden=64, layers=1, vocab=520)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATES["chatml"]
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    reply = tok("Yes", add_special_tokens=False)["input_ids"]
    chain = [tok("\n", add_special_tokens=False)["input_ids"][-1], *reply, im_end,
             *tok(" more text after the turn", add_special_tokens=False)["input_ids"]]
    _write_on(model, chain)
    assert model.generation_config.eos_token_id == tok.eos_token_id != im_end
    model.save_pretrained(path)
    return path, reply + [im_end]


def _write_on(model, chain: list[int]) -> None:
    """Make ``model`` write ``chain`` on from its first token: blocks that add nothing, and a head that maps each
    token of the chain to the next (up to a token's second appearance in it: then to both)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.copy_(torch.nn.functional.normalize(torch.randn(embed.shape, generator=torch.Generator().manual_seed(0)),
                                                  dim=-1))
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros_like(model.lm_head.weight)
        for a, b in zip(chain, chain[1:]):
            head[b] += 50 * embed[a] / embed[a].norm()
        model.lm_head.weight.copy_(head)


def test_the_merged_export_stops_where_the_template_taught_in_plain_transformers(turn_model, tmp_path):
    """The merged export's generation_config.json lists the template's end-of-turn token besides the base's EOS, so
    transformers' generate (and a server reading the file) stops a reply there, as `lora-dist generate` does; the
    base's file listed its EOS alone, the export copied it, and the reply ran on past the turn. Also where the
    base has no generation_config.json (transformers derives one from config.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_dist import LoRAConfig, inject_lora, save_adapter
    from lora_dist.export import merge_offline

    base, reply = turn_model
    tok = AutoTokenizer.from_pretrained(base)
    eos, im_end = tok.eos_token_id, reply[-1]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter", str(base))
    bare = shutil.copytree(base, tmp_path / "bare")
    (bare / "generation_config.json").unlink()
    prompt = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]])
    for name, source in (("merged", base), ("merged-bare", bare)):
        merge_offline(source, tmp_path / "adapter", tmp_path / name)
        config = json.loads((tmp_path / name / "generation_config.json").read_text())
        assert config["eos_token_id"] == [eos, im_end]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
        out = merged.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
        assert out == reply
        if source is base:  # the rest of the base's file as it was
            base_config = json.loads((base / "generation_config.json").read_text())
            assert {**config, "eos_token_id": eos} == base_config
    # A file transformers would not read as a generation config is copied as it is, the export complete.
    odd = shutil.copytree(base, tmp_path / "odd")
    (odd / "generation_config.json").write_text("null\n")
    merge_offline(odd, tmp_path / "adapter", tmp_path / "merged-odd")
    assert (tmp_path / "merged-odd" / "generation_config.json").read_text() == "null\n"


def test_generate_stops_at_an_end_of_turn_text(tiny_checkpoint, tmp_path):
    """A template whose markers are text in the model's vocabulary (ChatML's on a GPT-2-style one) teaches a reply
    to end with that text: generate stops there and cuts the reply before it; before, it ran to --max-new-tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = shutil.copytree(tiny_checkpoint("llama", hidden=64, layers=1), tmp_path / "base")
    template = tmp_path / "end.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %} [end]"
                        "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tok = AutoTokenizer.from_pretrained(base)
    prompt = tok("user: hi\nassistant:", add_special_tokens=False)["input_ids"]
    chain = [prompt[-1], *tok(" ok [end] more words after", add_special_tokens=False)["input_ids"]]
    through = len(tok(" ok [end]", add_special_tokens=False)["input_ids"]) + 1
    assert len(set(chain[:through])) == through  # written as it is up to the stop
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    _write_on(model, chain)
    model.save_pretrained(base)
    result = generate(base, prompt="hi", max_new_tokens=20, chat_template=str(template))
    assert result.prompt == "user: hi\nassistant:"
    assert result.text == " ok" and result.new_tokens == chain[1:through]


def test_generate_stops_at_the_end_of_turn_token_the_template_taught(turn_model):
    """Training with a chatml template teaches a reply to end with <|im_end|> (no EOS follows it): generate stops
    there, as transformers' generate does given <|im_end|> as a stop token; before, it stopped only at the
    generation config's EOS, and the reply ran on past the turn."""
    from transformers import AutoModelForCausalLM

    from lora_dist.chat import chat_document
    from lora_dist.data import load_tokenizer

    base, reply = turn_model
    tok = load_tokenizer(base)
    result = generate(base, prompt="hi", max_new_tokens=12)
    assert result.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert result.new_tokens == reply and result.text == "Yes"
    ids, labels = chat_document(tok, tok.chat_template, [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "Yes"}])
    assert [label for label in labels if label != -100] == reply  # what training learns: "Yes<|im_end|>", no EOS

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    prompt = torch.tensor([tok(result.prompt, add_special_tokens=False)["input_ids"]])
    for stops, expected in (([tok.eos_token_id, reply[-1]], reply), (None, None)):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
        if expected is not None:
            assert out == expected
        else:  # the generation config's EOS alone: on past the turn
            assert out[:len(reply)] == reply and len(out) == 12


@pytest.fixture(scope="module")
def templated(trained, tmp_path_factory):
    """(adapter, merged): ``trained``'s adapter as a run with data.chat_template=chatml writes it (with
    chat_template.jinja), and the checkpoint merged from it (which carries the template too)."""
    import shutil

    from lora_dist.chat import TEMPLATES
    from lora_dist.export import merge_offline
    from lora_dist.outputs import CHAT_TEMPLATE_FILE

    base, adapter, _ = trained
    tmp = tmp_path_factory.mktemp("templated")
    shutil.copytree(adapter, tmp / "adapter")
    (tmp / "adapter" / CHAT_TEMPLATE_FILE).write_text(TEMPLATES["chatml"])
    merge_offline(base, tmp / "adapter", tmp / "merged")
    assert (tmp / "merged" / CHAT_TEMPLATE_FILE).is_file()
    return tmp / "adapter", tmp / "merged"


def test_base_with_adapter_renders_with_the_template_the_adapter_was_trained_with(trained, templated):
    """The base has no template; the adapter carries the chatml it was trained with: base + adapter renders the
    prompt with it, as the merged checkpoint does (transformers reads its chat_template.jinja), and gives the same
    tokens. ``--chat-template none`` sends the raw text (as text records are trained)."""
    base, _, _ = trained
    adapter, merged = templated
    with_adapter = generate(base, adapter, prompt=PROMPT, max_new_tokens=8)
    from_merged = generate(merged, prompt=PROMPT, max_new_tokens=8)
    assert with_adapter.prompt == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n" == from_merged.prompt
    assert with_adapter.new_tokens == from_merged.new_tokens
    assert generate(base, adapter, prompt=PROMPT, max_new_tokens=1, chat_template="none").prompt == PROMPT
    assert f"<|start_header_id|>user<|end_header_id|>\n\n{PROMPT}<|eot_id|>" in generate(
        base, adapter, prompt=PROMPT, max_new_tokens=1, chat_template="llama3").prompt  # an explicit one wins


def test_a_parts_only_template_gets_the_prompt_as_training_renders_it(trained, tmp_path):
    """SmolVLM's template renders a message's text only from content parts: the prompt is handed to it as one text
    part, as training hands each string (before: "User:<end_of_utterance>", the text missing); its tokens are the
    start of the conversation training tokenizes."""
    from importlib.resources import files

    from lora_dist.chat import chat_document
    from lora_dist.data import load_tokenizer

    base, adapter, _ = trained
    template = (files("trl") / "chat_templates" / "smolvlm.jinja").read_text()
    (tmp_path / "smolvlm.jinja").write_text(template)
    result = generate(base, adapter, prompt="hello there", max_new_tokens=2,
                      chat_template=str(tmp_path / "smolvlm.jinja"))
    tok = load_tokenizer(base)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert result.prompt == tok.apply_chat_template(parts, chat_template=template, tokenize=False,
                                                    add_generation_prompt=True)
    assert "User: hello there<end_of_utterance>" in result.prompt
    ids, _ = chat_document(tok, template, [{"role": "user", "content": "hello there"},
                                           {"role": "assistant", "content": "Hi."}])
    prompt_ids = tok(result.prompt, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("options", [{}, {"top_k": 5}, {"top_p": 0.7}, {"top_k": 0, "top_p": 0.9}])
def test_sampling_equals_transformers_generate_with_the_same_settings(trained, options):
    """Sampling leaves what --top-k/--top-p do not set to transformers (top_k 50 by default): the same seed gives the
    same tokens as transformers' generate with the same settings (before: top_k and top_p were always switched
    off)."""
    from transformers import AutoModelForCausalLM

    from lora_dist.data import load_tokenizer

    base, _, _ = trained
    ours = generate(base, prompt=PROMPT, max_new_tokens=16, temperature=1.5, seed=4, chat_template="none", **options)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(base)(PROMPT)["input_ids"]])
    torch.manual_seed(4)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=True, temperature=1.5,
                         **options)
    assert out[0, ids.shape[1]:].tolist() == ours.new_tokens


def test_sampling_uses_the_models_generation_config(trained, tmp_path):
    """A checkpoint whose generation_config.json sets top_k/top_p samples with them, as transformers does."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lora_dist.data import load_tokenizer

    base = shutil.copytree(trained[0], tmp_path / "base")
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "top_k": 3, "top_p": 0.8}))
    ours = generate(base, prompt=PROMPT, max_new_tokens=16, temperature=1.5, seed=2, chat_template="none")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert model.generation_config.top_k == 3
    ids = torch.tensor([load_tokenizer(base)(PROMPT)["input_ids"]])
    torch.manual_seed(2)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=True, temperature=1.5)
    assert out[0, ids.shape[1]:].tolist() == ours.new_tokens
    torch.manual_seed(2)
    wide = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=True,
                          temperature=1.5, top_k=None, top_p=None)
    assert wide[0, ids.shape[1]:].tolist() != ours.new_tokens  # the config's cuts matter here


@pytest.mark.parametrize("args, message", [
    (["--chat-template", "llama"], "--chat-template='llama' is neither a shipped template (chatml, llama3) nor a "
                                   "Jinja file; pass one of those names or a file path"),
    (["--device", "gpu"], "--device 'gpu' is not a device; pass cpu, cuda or cuda:N"),
    (["--device", "cuda:64"], "--device cuda:64: "),
    (["--top-k", "5"], "--top-k and --top-p shape sampling, and --temperature 0 decodes greedily"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
])
def test_generate_errors_are_one_line(trained, capsys, args, message):
    """A bad option is one line naming it and the fix, exit 2 (before: ChatError naming data.chat_template, and
    torch's AssertionError or RuntimeError, as tracebacks)."""
    from lora_dist.cli import EXIT_USAGE, main

    base, _, _ = trained
    assert main(["generate", "--base", str(base), "--prompt", "x", *args]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"lora-dist generate: error: {message}") and err.count("\n") == 1, err
    assert "data.chat_template" not in err


def test_generate_on_cuda_without_cuda_is_one_line(trained, capsys, monkeypatch):
    """``--device cuda`` where this process sees no CUDA device (before: torch's "Torch not compiled with CUDA
    enabled" AssertionError, a traceback)."""
    from lora_dist.cli import EXIT_USAGE, main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only build, or CUDA_VISIBLE_DEVICES=
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    base, _, _ = trained
    assert main(["generate", "--base", str(base), "--prompt", "x", "--device", "cuda"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("lora-dist generate: error: --device cuda: no CUDA device is visible to this process") and \
        err.endswith("; pass --device cpu\n") and err.count("\n") == 1, err


def test_a_raw_prompt_is_encoded_as_training_encodes_a_prompt():
    """``--chat-template none``: BOS where training puts one (not twice where the text starts with it), and no EOS
    a tokenizer adds to every text itself: generation would start after an end of text."""
    from lora_dist.generate import _prompt_ids

    class AddsBosAndEos:
        """A character per token; "^" is the BOS token's text."""
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=True):
            ids = [1 if c == "^" else ord(c) for c in text]
            return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}

    assert _prompt_ids(AddsBosAndEos(), "hi", None, None) == ([1, ord("h"), ord("i")], "hi")
    assert _prompt_ids(AddsBosAndEos(), "^hi", None, None) == ([1, ord("h"), ord("i")], "^hi")

    class NoBos(AddsBosAndEos):
        bos_token_id = None

    with pytest.raises(GenerateError, match="the prompt is empty"):
        _prompt_ids(NoBos(), "", None, None)
