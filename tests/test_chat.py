"""Chat records: loss masks on assistant turns only, with real template styles that have no
``{% generation %}`` markers (Qwen2/ChatML, Llama-3, Gemma, Mistral), checked against the token prefix
property and against transformers' own ``{% generation %}`` mask; record formats and their errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lora_dist.chat import LOSS_ON, TEMPLATES, ChatError, chat_document, check_messages
from lora_dist.data import IGNORE, DataError, load_dataset
from lora_dist.demo import make_tokenizer

# The templates as the models ship them in tokenizer_config.json (Qwen2-7B-Instruct, Meta-Llama-3-8B-Instruct,
# gemma-7b-it, Mistral-7B-Instruct-v0.2).
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
LLAMA3 = TEMPLATES["llama3"]
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
    "role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}"
)
SPECIAL = {
    "qwen2": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "mistral": [],
}
TEMPLATE = {"qwen2": QWEN2, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL}
#: What each template makes of an assistant message: the span the loss falls on (content + end-of-turn token).
LEARNED = {
    "qwen2": lambda c: c + "<|im_end|>",
    "llama3": lambda c: c.strip() + "<|eot_id|>",
    "gemma": lambda c: c.strip() + "<end_of_turn>",
    "mistral": lambda c: c + "<|endoftext|>",
}

TURNS = [
    {"role": "user", "content": "Which animal builds wooden boats?"},
    {"role": "assistant", "content": "The red fox builds wooden boats."},
    {"role": "user", "content": "And in the morning?"},
    {"role": "assistant", "content": " A grey cat counts silver keys\nnear the harbour. "},
]
SYSTEM = {"role": "system", "content": "You answer in one sentence."}
TOOL_TURNS = [SYSTEM, {"role": "user", "content": "Count the keys."},
              {"role": "assistant", "content": "count_keys()"}, {"role": "tool", "content": "7 silver keys"},
              {"role": "assistant", "content": "There are 7 keys."}]


def style_tokenizer(style: str):
    tok = make_tokenizer()
    if SPECIAL[style]:
        tok.add_special_tokens({"additional_special_tokens": SPECIAL[style]})
    if style == "llama3":
        tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = TEMPLATE[style]
    return tok


def spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of labelled tokens."""
    runs: list[list[int]] = []
    for k, (i, lab) in enumerate(zip(ids, labels)):
        if lab == IGNORE:
            continue
        assert lab == i
        if k and labels[k - 1] != IGNORE:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def conversation(style: str) -> list[dict]:
    if style == "qwen2":
        return TOOL_TURNS + TURNS
    if style == "llama3":
        return [SYSTEM] + TURNS
    return TURNS  # Gemma and Mistral refuse a system role, Mistral a tool role


@pytest.mark.parametrize("style", list(TEMPLATE))
@pytest.mark.parametrize("offsets", [True, False], ids=["offsets", "prefixes"])
def test_loss_falls_on_assistant_turns_only(style, offsets):
    tok = style_tokenizer(style)
    messages = conversation(style)
    ids, labels = chat_document(tok, tok.chat_template, messages, offsets=offsets)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]  # tokenized once, as a whole
    learned = [tok.decode(run) for run in spans(ids, labels)]
    assert learned == [LEARNED[style](m["content"]) for m in messages if m["role"] == "assistant"]
    # The token prefix property: each prompt (up to the assistant header) tokenizes to a prefix of the whole.
    starts = [k for k in range(len(labels)) if labels[k] != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]
    prompts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i, start in zip(prompts, starts):
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        assert ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", list(TEMPLATE))
def test_loss_on_the_last_assistant_turn(style):
    tok = style_tokenizer(style)
    messages = conversation(style)
    ids, labels = chat_document(tok, tok.chat_template, messages, loss_on="last_assistant")
    assert [tok.decode(run) for run in spans(ids, labels)] == [LEARNED[style](messages[-1]["content"])]


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_a_conversation_opening_with_an_assistant_turn_learns_no_header(style):
    """No empty conversation renders (transformers 5), so the turn's start is the assistant header the template
    writes after a user message: neither it nor Qwen2's default system prompt before it is learned."""
    tok = style_tokenizer(style)
    messages = [{"role": "assistant", "content": "Hello, how can I help?"}, *TURNS[2:]]
    ids, labels = chat_document(tok, tok.chat_template, messages)
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        LEARNED[style](m["content"]) for m in messages if m["role"] == "assistant"]


CHATML_GENERATION = (  # ChatML with {% generation %} markers: transformers' own assistant mask
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + "
    "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@pytest.mark.parametrize("first", ["The red fox.", "\n\nThe red fox.", " the red fox", "!!"])
def test_same_mask_as_transformers_generation_markers(first):
    """The incremental masks of the marker-less ChatML equal transformers' mask from the marked one,
    also where the assistant text starts with whitespace or punctuation."""
    tok = style_tokenizer("qwen2")
    messages = TOOL_TURNS[:2] + [{"role": "assistant", "content": first}] + TURNS[2:]
    ids, labels = chat_document(tok, TEMPLATES["chatml"], messages)
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=CHATML_GENERATION)
    assert ids == ref["input_ids"]
    assert [int(lab != IGNORE) for lab in labels] == ref["assistant_masks"]


def test_a_template_that_rewrites_the_last_message_is_masked_as_the_whole_renders_it():
    """Neither prompt nor turn renders are prefixes of the whole (the last message gets a suffix): each turn is
    found by its assistant header and its end-of-turn token."""
    tok = style_tokenizer("qwen2")
    rewrites = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% if loop.last %}"
                "{{ ' (last)' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    ids, labels = chat_document(tok, rewrites, TURNS)
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        TURNS[1]["content"] + "<|im_end|>", TURNS[3]["content"] + " (last)<|im_end|>"]


def test_a_prompt_that_prefills_what_the_whole_never_writes_starts_after_its_role_line():
    """Like Nemotron 3: the generation prompt prefills a ``<think>`` block that the whole conversation's render never
    writes. Each turn starts after the prompt's role line (before, every conversation was refused). A prompt with
    no line or special token of the assistant's own is refused, whichever turns are learned."""
    tok = style_tokenizer("qwen2")
    opens = TEMPLATES["chatml"].replace("'<|im_start|>assistant\n' }}{% endif %}",
                                        "'<|im_start|>assistant\n<think>\n' }}{% endif %}")
    assert opens != TEMPLATES["chatml"]
    ids, labels = chat_document(tok, opens, TURNS)
    assert [tok.decode(run) for run in spans(ids, labels)] == [m["content"] + "<|im_end|>" for m in TURNS[1::2]]
    inline = TEMPLATES["chatml"].replace("'<|im_start|>assistant\n' }}{% endif %}",
                                         "'<|im_start|>assistant thinking: ' }}{% endif %}")
    for loss_on in LOSS_ON:  # the last turn alone cannot be bounded either: no advice to learn only it
        with pytest.raises(ChatError, match=r"renders messages\[:[13]\] differently .* no assistant header stands "
                                            r"before the turn there, so .*; set data.chat_template to a template "
                                            r"that renders earlier turns the same way$"):
            chat_document(tok, inline, TURNS, loss_on=loss_on)


def trl_template(name: str) -> str:
    """A chat template TRL ships (the Hub's own, byte for byte, and TRL's training variants)."""
    from importlib.resources import files

    return (files("trl") / "chat_templates" / f"{name}.jinja").read_text()


def deepseek_tokenizer():
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]})
    return tok


R1_TURNS = [SYSTEM, {"role": "user", "content": "Which animal builds wooden boats?"},
            {"role": "assistant", "content": "<think>\nFoxes like wood.\n</think>\n\nThe red fox."},
            {"role": "user", "content": "Count the keys."},
            {"role": "assistant", "content": "<think>\nThere were seven.\n</think>\n\nSeven keys."}]


def test_deepseek_r1_distills_learn_each_answer_after_the_assistant_token():
    """The distills' template prefills ``<｜Assistant｜><think>\n`` (the model's output starts inside its reasoning),
    which the whole conversation never writes; before, every conversation was refused. A turn now starts after the
    assistant's own token, the prefill left out (TRL's training variant keeps the reasoning, whose opener the
    prefill writes)."""
    tok = deepseek_tokenizer()
    plain = [{**m, "content": m["content"].split("\n\n")[-1]} if m["role"] == "assistant" else m for m in R1_TURNS]
    ids, labels = chat_document(tok, trl_template("deepseek_r1_distill"), plain)
    assert [tok.decode(run) for run in spans(ids, labels)] == ["The red fox.<｜end▁of▁sentence｜>",
                                                               "Seven keys.<｜end▁of▁sentence｜>"]
    ids, labels = chat_document(tok, trl_template("deepseek_r1_distill_training"), R1_TURNS)
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        "Foxes like wood.\n</think>\n\nThe red fox.<｜end▁of▁sentence｜>",
        "There were seven.\n</think>\n\nSeven keys.<｜end▁of▁sentence｜>"]
    # Turns with and without reasoning in one conversation: a turn without reasoning has no "<think>\n" after its
    # <｜Assistant｜> even where others do (before, such conversations were refused).
    mixed = [*R1_TURNS[:2], {"role": "assistant", "content": "The red fox."}, *R1_TURNS[3:]]
    for conversation in (mixed, [*R1_TURNS[:3], R1_TURNS[3], {"role": "assistant", "content": "Seven keys."}]):
        ids, labels = chat_document(tok, trl_template("deepseek_r1_distill_training"), conversation)
        learned = [m["content"].removeprefix("<think>\n") + "<｜end▁of▁sentence｜>" for m in conversation[2::2]]
        assert [tok.decode(run) for run in spans(ids, labels)] == learned
    # ChatML's <|im_start|> alone is no assistant header: it starts a user's header too
    # (test_a_prompt_that_prefills_what_the_whole_never_writes_starts_after_its_role_line).


@pytest.mark.parametrize("loss_on", LOSS_ON)
def test_a_template_that_drops_a_learned_turns_text_is_refused(loss_on):
    """The distills' shipped template drops everything before ``</think>`` from every turn, the last one too, and a
    template may render an assistant's text only from content parts: such a turn would be trained without its
    reasoning or its text, silently. Earlier turns' reasoning may be dropped by design (Qwen3's history,
    test_qwen3_multi_turn_learns_each_turn_as_the_conversation_renders_it)."""
    with pytest.raises(ChatError, match=r"leaves the reasoning \(before </think>\) of messages\[4\] \('There were "
                                        r"seven\.'\) out of the assistant turn it renders, .*deepseek_r1_distill_"
                                        r"training\.jinja"):
        chat_document(deepseek_tokenizer(), trl_template("deepseek_r1_distill"), R1_TURNS, loss_on=loss_on)
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_utterance>"]})
    # one that drops the assistant's string content, as SmolVLM's drops every string (lora_dist hands SmolVLM's the
    # text as a part: test_smolvlm_and_idefics3_learn_text_given_as_a_string)
    assistant_parts = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] != 'assistant' %}"
                       "{{ m['content'] }}{% elif m['content'] is not string %}{{ m['content'][0]['text'] }}{% endif %}"
                       "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                       "{% endif %}")
    first = 1 if loss_on == "all_assistant" else 3
    with pytest.raises(ChatError, match=rf"leaves the text of messages\[{first}\] \('{TURNS[first]['content'].strip()[:10]}.*\) "
                                        r"out of the assistant turn it renders"):
        chat_document(tok, assistant_parts, TURNS, loss_on=loss_on)


@pytest.mark.parametrize("name", ["smolvlm", "idefics3"])
def test_smolvlm_and_idefics3_learn_text_given_as_a_string(name):
    """SmolVLM's and Idefics3's templates render a message's text only from a list of content parts: a string
    content printed nothing (before: refused; earlier still, each turn learned ``<end_of_utterance>`` alone). Each
    string is handed to them as one text part; the spans are those TRL's ``*_training`` variant marks
    (test_masks_agree_with_trl_generation_markers_on_its_shipped_templates) and those of the same conversation
    given as parts."""
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_utterance>"]})
    ids, labels = chat_document(tok, trl_template(name), check_messages([SYSTEM, *TURNS]))
    assert [tok.decode(run) for run in spans(ids, labels)] == [" " + m["content"] + "<end_of_utterance>"
                                                               for m in TURNS[1::2]]
    assert "System: You answer in one sentence.<end_of_utterance>\nUser: Which animal" in tok.decode(ids)
    parts = as_parts([SYSTEM, *TURNS])
    assert chat_document(tok, trl_template(name), check_messages(parts)) == (ids, labels)
    qwen = style_tokenizer("qwen2")  # a template that renders strings is handed strings
    assert chat_document(qwen, QWEN2, check_messages(parts)) == chat_document(qwen, QWEN2, [SYSTEM, *TURNS])


def test_deepseek_v3s_call_after_a_tool_result_is_refused_not_learned_empty():
    """DeepSeek-V3's template writes an assistant's tool call that follows a tool result inside the tool outputs
    (no ``<｜tool▁outputs▁end｜>``, no ``<｜tool▁calls▁begin｜>``), where its generation prompt never leads: the turn
    found is empty. Refused, naming the call (before, the message said the template renders no tool calls)."""
    tok = deepseek_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [
        "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>",
        "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>"]})

    def calls(name):
        return [{"type": "function", "function": {"name": name, "arguments": '{"where": "harbour"}'}}]

    one = [{"role": "user", "content": "Count the keys."},
           {"role": "assistant", "content": "", "tool_calls": calls("count_keys")},
           {"role": "tool", "content": "7 silver keys"}, {"role": "assistant", "content": "There are 7 keys."}]
    ids, labels = chat_document(tok, trl_template("deepseekv3"), one)
    learned = [tok.decode(run) for run in spans(ids, labels)]
    assert "count_keys" in learned[0] and learned[1] == "There are 7 keys.<｜end▁of▁sentence｜>"
    two = [*one[:3], {"role": "assistant", "content": "", "tool_calls": calls("count_boats")},
           {"role": "tool", "content": "2 boats"}, one[3]]
    with pytest.raises(ChatError, match=r"leaves the tool call 'count_boats' of messages\[3\] out of the assistant "
                                        r"turn it renders \(.*DeepSeek-V3's for a call after a tool result"):
        chat_document(tok, trl_template("deepseekv3"), two)


# Mistral-7B-Instruct-v0.3's template, its system message and roles as shipped (tools left out).
MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + "
    "'[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}{%- endfor %}"
)


@pytest.mark.parametrize("loss_on", LOSS_ON)
def test_a_template_that_drops_a_system_or_user_message_is_refused(loss_on):
    """Mistral v0.3's template writes the system message only into a last user message, so a conversation to learn
    from (which ends with an assistant message) renders none; a template may skip a role it does not know. The turns
    would be learned without that context, silently. Without a system message Mistral v0.3 trains as always."""
    tok = style_tokenizer("mistral")
    with pytest.raises(ChatError, match=r"leaves the system message messages\[0\] \('You answer in one sentence.'\) "
                                        r"out of the conversation it renders \(as Mistral v0.3's, .*merge it into the first "
                                        r"user message, or set data.chat_template"):
        chat_document(tok, MISTRAL_V03, [SYSTEM, *TURNS], loss_on=loss_on)
    ids, labels = chat_document(tok, MISTRAL_V03, TURNS, loss_on=loss_on)
    learned = [" " + m["content"].strip() + tok.eos_token for m in TURNS[1::2]]
    assert [tok.decode(run) for run in spans(ids, labels)] == (learned if loss_on == "all_assistant" else learned[1:])
    skips = ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ '<|im_start|>' + m['role'] + '\n' + "
             "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ChatError, match=r"leaves the system message messages\[0\] \('You answer in one sentence.'\) out "
                                        r"of the conversation it renders, so .*; set data.chat_template"):
        chat_document(style_tokenizer("qwen2"), skips, [SYSTEM, *TURNS], loss_on=loss_on)
    # A template may rewrite the text it renders: SmolLM3's and Nemotron Nano v2's take out /think and /no_think.
    # The message is kept (a probe in its place is rendered), not refused.
    rewrites = QWEN2.replace("message['content']", "message['content'].replace('/no_think', '').strip()")
    switched = [{**SYSTEM, "content": "You answer in one sentence. /no_think"}, *TURNS]
    ids, labels = chat_document(style_tokenizer("qwen2"), rewrites, switched, loss_on=loss_on)
    learned = [m["content"].strip() + "<|im_end|>" for m in TURNS[1::2]]
    assert [style_tokenizer("qwen2").decode(run) for run in spans(ids, labels)] == (
        learned if loss_on == "all_assistant" else learned[1:])
    # Phi-3's template renders system, user and assistant messages only: a tool result is left out, and the answer
    # after it would be learned without the result it quotes.
    phi3_like = ("{% for m in messages %}{% if m['role'] in ['system', 'user', 'assistant'] %}{{ '<|im_start|>' + "
                 "m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ChatError, match=r"leaves the tool message messages\[3\] \('7 silver keys'\) out of the "
                                        r"conversation it renders"):
        chat_document(style_tokenizer("qwen2"), phi3_like, TOOL_TURNS, loss_on=loss_on)
    chat_document(style_tokenizer("qwen2"), QWEN2, TOOL_TURNS, loss_on=loss_on)  # one that renders it
    # a user message that calls tools (no content) is no message the check reads
    calling_user = [{"role": "user", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
                    *TURNS]
    chat_document(style_tokenizer("qwen2"), QWEN2.replace("message['content']", "(message['content'] or '')"),
                  calling_user, loss_on=loss_on)


def _trl_training_templates() -> list[str]:
    from importlib.resources import files

    return sorted(f.name.removesuffix(".jinja") for f in (files("trl") / "chat_templates").iterdir()
                  if f.name.endswith("_training.jinja"))


ORACLE_CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Which animal builds boats?"},
              {"role": "assistant", "content": "The red fox."}],
    "turns": [SYSTEM, {"role": "user", "content": "Q one?"}, {"role": "assistant", "content": "A one."},
              {"role": "user", "content": "Q two?"}, {"role": "assistant", "content": "A two."}],
    "reasoning": [{"role": "user", "content": "Which animal builds boats?"},
                  {"role": "assistant", "content": "<think>\nFoxes like wood.\n</think>\n\nThe red fox."}],
    "reasoning_turns": [SYSTEM, {"role": "user", "content": "Q one?"},
                        {"role": "assistant", "content": "<think>\nEarly thought.\n</think>\n\nA one."},
                        {"role": "user", "content": "Q two?"},
                        {"role": "assistant", "content": "<think>\nLate thought.\n</think>\n\nA two."}],
    "tools": [{"role": "user", "content": "Count the keys."},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "count_keys", "arguments": {"where": "harbour"}}}]},
              {"role": "tool", "content": "7 silver keys"}, {"role": "assistant", "content": "There are 7 keys."}],
    "agent": [{"role": "user", "content": "Count the keys."},
              {"role": "assistant", "content": "", "thinking": "Use the tool.", "tool_calls": [
                  {"type": "function", "function": {"name": "count_keys", "arguments": {"where": "harbour"}}}]},
              {"role": "tool", "content": "7 silver keys"},
              {"role": "assistant", "content": "There are 7 keys.", "thinking": "The tool said 7."},
              {"role": "user", "content": "And the boats?"},
              {"role": "assistant", "content": "Two boats.", "thinking": "Count the boats."}],
    "assistant_first": [{"role": "assistant", "content": "Ahoy! Ask me about the harbour."},
                        {"role": "user", "content": "Q one?"}, {"role": "assistant", "content": "A one."}],
}
#: Where lora_dist refuses what TRL's markers learn: the template drops text of a learned turn (the reasoning, a
#: string content, the tool calls), which would be trained without it; or a conversation opening with an assistant
#: message where the template writes no assistant header to start that turn after (LLaVA-NeXT), which trains with
#: data.loss_on=last_assistant (checked below).
ORACLE_REFUSED = {
    ("llava_next_training", "assistant_first"): "opens with an assistant message and no assistant header",
    ("deepseekv3_training", "reasoning"): "leaves the reasoning", ("deepseekv3_training", "reasoning_turns"):
    "leaves the reasoning",
    **{(t, c): "leaves the tool call" for t in ("deepseek_r1_distill_training", "idefics3_training", "lfm2_training",
                                                "llama3_training", "qwen2_5_vl_training", "smolvlm_training")
       for c in ("tools", "agent")},
    # Phi-3's templates render no tool role: the tool result is left out before the call is
    **{(t, c): "leaves the tool message" for t in ("phi3_5_training", "phi3_training") for c in ("tools", "agent")},
}
#: Where the spans differ by design: DiffusionGemma's prompt after a tool result has no model header, but the whole
#: writes one, so the turn learns it (as a model prompted that way must write it); TRL's markers leave it out.
ORACLE_DIFFERENT = {("diffusion_gemma_training", "tools"), ("diffusion_gemma_training", "agent")}


def as_parts(messages: list[dict]) -> list[dict]:
    """Each string content as one text part (OpenAI's form, a vision-language template's)."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


def _render_or_fail(tok, template: str, messages: list[dict]) -> str:
    try:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:
        return ""


@pytest.mark.parametrize("name", _trl_training_templates())
def test_masks_agree_with_trl_generation_markers_on_its_shipped_templates(name):
    """TRL ships 29 real templates with ``{% generation %}`` markers (Qwen2.5-3.6, Llama 3, Gemma 1-3, Phi-3,
    gpt-oss, DeepSeek-V3 and R1 distills, Nemotron 3, Cohere, LFM2, SmolVLM...); transformers turns them into
    assistant masks, an oracle lora_dist's own boundary search never reads. On plain, multi-turn, reasoning and
    tool-calling conversations, and one opening with an assistant message, each learned span is TRL's, less what the
    generation prompt writes (the role header, a prefill such as ``<think>\n``) and the whitespace after the
    end-of-turn token; a conversation the template fails on is refused; and lora_dist refuses where the template
    drops a learned turn's text (:data:`ORACLE_REFUSED`), which TRL's markers train without, silently, or where an
    opening assistant turn cannot be bounded (then its last turn alone is TRL's last span)."""
    import re

    template = trl_template(name)
    tok = style_tokenizer("qwen2")
    specials = set(re.findall(r"<\|[^|<>]{1,40}\|>|<｜[^｜]{1,40}｜>|<\|[a-z_]{1,30}>|<[a-z_]{1,20}\|>", template))
    tok.add_special_tokens({"additional_special_tokens": sorted(specials)})
    # Vision-language templates (SmolVLM, Idefics3, LLaVA-NeXT) render a text only from content parts: transformers
    # is given each text as one part, as lora_dist hands it to them.
    parts_only = "Probe" not in _render_or_fail(tok, template, [{"role": "user", "content": "Probe"}]) and \
        "Probe" in _render_or_fail(tok, template, as_parts([{"role": "user", "content": "Probe"}]))

    def agree(conv, messages, given, ours, theirs, assistants):
        assert len(ours) == len(theirs) == len(assistants), (conv, ours, theirs)
        for i, got, want in zip(assistants, ours, theirs):
            want = want.rstrip()
            assert got.strip() and want.endswith(got), (conv, got, want)
            # what the prompt writes after the last message (for a conversation's first message: after a user's)
            probe = [{"role": "user", "content": "Probe"}]
            context = given[:i] or (as_parts(probe) if parts_only else probe)
            prompt = tok.apply_chat_template(context, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
            last = messages[i - 1]["content"] if i else "Probe"
            assert last in prompt, (conv, prompt)
            after = prompt[prompt.rfind(last) + len(last):]
            assert want[: len(want) - len(got)] in after, (conv, got, want)  # the role header, a prefill

    for conv, messages in ORACLE_CONVERSATIONS.items():
        given = as_parts(messages) if parts_only else messages
        try:
            enc = tok.apply_chat_template(given, chat_template=template, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        except Exception:  # the template refuses the conversation (a system or tool role it does not take...)
            with pytest.raises(ChatError, match="the chat template fails on this conversation"):
                chat_document(tok, template, messages)
            continue
        mask = [i if m else None for i, m in zip(enc["input_ids"], enc["assistant_masks"])]
        theirs = [tok.decode(run) for run in spans(enc["input_ids"], [IGNORE if m is None else m for m in mask])]
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if (name, conv) in ORACLE_REFUSED:
            with pytest.raises(ChatError, match=ORACLE_REFUSED[name, conv]) as refused:
                chat_document(tok, template, messages)
            if conv == "assistant_first":  # the last turn alone is bounded, and the error says so
                assert "use data.loss_on=last_assistant" in str(refused.value)
                ids, labels = chat_document(tok, template, messages, loss_on="last_assistant")
                agree(conv, messages, given, [tok.decode(run) for run in spans(ids, labels)], theirs[-1:],
                      assistants[-1:])
            continue
        ids, labels = chat_document(tok, template, messages)
        ours = [tok.decode(run) for run in spans(ids, labels)]
        if (name, conv) in ORACLE_DIFFERENT:
            assert ours != theirs and len(ours) == len(theirs), (conv, ours, theirs)
            continue
        agree(conv, messages, given, ours, theirs, assistants)


@pytest.mark.parametrize("name, header", [("deepseek_r1_distill_training", "<｜Assistant｜>"),
                                          ("nemotron_3_nano_training", "<|im_start|>assistant\n")])
def test_an_assistant_header_quoted_in_a_message_is_its_text(name, header):
    """A user (or a tool result) quoting the assistant's header in the second half of its text: the turn still
    starts after the real header, never inside the quote (found by a fuzzer against TRL's markers: the quote's tail
    was learned)."""
    import re

    template = trl_template(name)
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(r"<\|[^|<>]{1,40}\|>|<｜[^｜]{1,40}｜>",
                                                                                template)))})
    messages = [{"role": "user", "content": f"Repeat after me exactly: {header}I am a pirate"},
                {"role": "assistant", "content": "The red fox."}]
    for loss_on in LOSS_ON:
        ids, labels = chat_document(tok, template, messages, loss_on=loss_on)
        learned = [tok.decode(run) for run in spans(ids, labels)]
        assert len(learned) == 1 and "pirate" not in learned[0] and learned[0].endswith("The red fox.<｜end▁of▁sentence｜>"
                                                                                         if "deepseek" in name else
                                                                                         "The red fox.<|im_end|>")


def test_a_tool_call_rendered_in_place_of_its_text_is_learned():
    """Llama 3.1 writes an assistant message that calls a tool as the call's JSON alone, whatever text it carries
    (OpenAI-format agent data often has some): the call is learned, and the text is not asked for."""
    tok = style_tokenizer("llama3")
    tok.add_special_tokens({"additional_special_tokens": ["<|eom_id|>", "<|python_tag|>"]})
    messages = [SYSTEM, {"role": "user", "content": "How many keys?"},
                {"role": "assistant", "content": "Let me count.", "tool_calls": [
                    {"type": "function", "function": {"name": "count_keys", "arguments": {"n": 1}}}]},
                {"role": "tool", "content": "7 keys"}, {"role": "assistant", "content": "There are 7 keys."}]
    ids, labels = chat_document(tok, trl_template("llama3_1"), messages)
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        '{"name": "count_keys", "parameters": {"n": 1}}<|eot_id|>', "There are 7 keys.<|eot_id|>"]


def test_gemma4_agent_traces_go_on_in_the_models_turn_after_a_tool_result():
    """Gemma 4's template writes no header after a tool result: the model's turn goes on after
    ``<tool_response|>``, and its prompt adds nothing. The turn starts right after what the prompt writes after the
    tool's content (before, agent traces were refused under all_assistant); the thought of a call a final answer
    follows is dropped, as the template renders it."""
    import re

    template = trl_template("gemma4")
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(
        r"<\|[^|<>]{1,40}\|>|<\|[a-z_\"]{1,30}>|<[a-z_]{1,20}\|>", template)))})
    ids, labels = chat_document(tok, template, ORACLE_CONVERSATIONS["agent"])
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        '<|tool_call>call:count_keys{where:<|"|>harbour<|"|>}<tool_call|><|tool_response>',
        "There are 7 keys.<turn|>", "Two boats.<turn|>"]


#: Qwen3's chat template as Qwen3-8B ships it: reasoning kept only after the last user query, an empty
#: <think> block written only in the last turn, tool calls and responses.
QWEN3 = (Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja").read_text()
QWEN3_TURNS = [
    SYSTEM,
    {"role": "user", "content": "Which animal builds wooden boats?"},
    {"role": "assistant", "content": "<think>\nFoxes like boats.\n</think>\n\nThe red fox builds wooden boats."},
    {"role": "user", "content": "Count the keys."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "count_keys", "arguments": {"where": "harbour"}}}]},
    {"role": "tool", "content": "7 silver keys"},
    {"role": "assistant", "content": "There are 7 keys.", "reasoning_content": "The tool said 7."},
]


def qwen3_tokenizer():
    tok = style_tokenizer("qwen2")
    tok.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.chat_template = QWEN3
    return tok


def test_qwen3_multi_turn_learns_each_turn_as_the_conversation_renders_it():
    """Qwen3 renders a turn differently once later messages follow it (no reasoning before the last user
    query; an empty <think> block only in the last turn). Each turn is learned as the whole conversation
    renders it, through <|im_end|>: an earlier turn's reasoning is dropped, the last turn's is kept."""
    tok = qwen3_tokenizer()
    ids, labels = chat_document(tok, QWEN3, QWEN3_TURNS)
    assert ids == tok(tok.apply_chat_template(QWEN3_TURNS, tokenize=False), add_special_tokens=False)["input_ids"]
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        "The red fox builds wooden boats.<|im_end|>",
        '<tool_call>\n{"name": "count_keys", "arguments": {"where": "harbour"}}\n</tool_call><|im_end|>',
        "<think>\nThe tool said 7.\n</think>\n\nThere are 7 keys.<|im_end|>",
    ]
    last_ids, last_labels = chat_document(tok, QWEN3, QWEN3_TURNS, loss_on="last_assistant")
    assert last_ids == ids and [tok.decode(run) for run in spans(ids, last_labels)] == [
        "<think>\nThe tool said 7.\n</think>\n\nThere are 7 keys.<|im_end|>"]


def test_qwen3_conversations_from_a_data_file(tmp_path):
    """A data file of Qwen3 conversations, with the tokenizer's own template: every turn learned."""
    tok = qwen3_tokenizer()
    path = write(tmp_path / "chat.jsonl", [{"messages": QWEN3_TURNS}, {"messages": QWEN3_TURNS[1:5]}])
    ds = load_dataset(path, tok, seq_len=512, packing=False)
    assert ds.stats.records == {"messages": 2}
    for k, messages in enumerate([QWEN3_TURNS, QWEN3_TURNS[1:5]]):
        ids, labels = chat_document(tok, QWEN3, messages)
        n = int(ds.lengths[k])
        assert ds.input_ids[k][:n].tolist() == ids and ds.labels[k][1:n].tolist() == labels[1:]


def qwen3_with_generation_markers() -> str:
    """Qwen3's template with {% generation %} around each assistant turn's body and <|im_end|>."""
    marked = QWEN3.replace("'<|im_start|>' + message.role + '\\n<think>\\n'", "'<think>\\n'")
    marked = marked.replace("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{{- content }}")
    branch = '{%- elif message.role == "assistant" %}'
    marked = marked.replace(branch, branch + "{{- '<|im_start|>assistant\\n' }}{% generation %}")
    tool = '\n    {%- elif message.role == "tool" %}'
    marked = marked.replace("{{- '<|im_end|>\\n' }}" + tool, "{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}" + tool)
    assert marked.count("{% generation %}") == 1 and marked.count("{% endgeneration %}") == 1
    assert marked.count("'<|im_start|>' + message.role") == 1  # the user/system one is left
    return marked


#: An agent trace: the tool-calling turn reasons, then a later user query makes Qwen3 drop that reasoning, so
#: neither the later turns' prompts nor that turn's render are prefixes of the whole.
QWEN3_AGENT = [
    QWEN3_TURNS[3],
    {**QWEN3_TURNS[4], "reasoning_content": "The keys are in the harbour."},
    QWEN3_TURNS[5],
    {"role": "assistant", "content": "<think>\nThe tool said 7.\n</think>\n\nThere are 7 keys."},
    {"role": "user", "content": "And the boats?"},
    {"role": "assistant", "content": "Two boats.", "reasoning_content": "Count them."},
]


#: Qwen3 takes a user message wrapped in <tool_response> for a tool result: a probe in its place must not make it a
#: query (which would drop the reasoning of the turn before).
QWEN3_WRAPPED = [
    {"role": "user", "content": "Count the keys."},
    {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "count_keys", "arguments": {}}}]},
    {"role": "tool", "content": "7"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "check",
                                                                                        "arguments": {}}}]},
    {"role": "user", "content": "<tool_response>ok</tool_response>"},
    {"role": "assistant", "content": "There are 7 keys."},
]


@pytest.mark.parametrize("messages", [QWEN3_TURNS[:3], QWEN3_TURNS[:5], QWEN3_TURNS, QWEN3_AGENT[:4], QWEN3_AGENT,
                                      QWEN3_WRAPPED],
                         ids=["one-turn", "tool-call", "whole", "agent", "agent-then-query", "wrapped-tool-response"])
def test_qwen3_masks_equal_transformers_generation_markers(messages):
    tok = qwen3_tokenizer()
    ids, labels = chat_document(tok, QWEN3, messages)
    marked = qwen3_with_generation_markers()
    assert tok.apply_chat_template(messages, tokenize=False, chat_template=marked) == \
        tok.apply_chat_template(messages, tokenize=False)  # the markers change nothing rendered
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=marked)
    assert ids == ref["input_ids"]
    assert [int(lab != IGNORE) for lab in labels] == ref["assistant_masks"]


@pytest.mark.parametrize("special, template, learned", [
    # Cohere's turns end with two tokens: an earlier turn, rendered differently, learns both, as the last does.
    (["<|START|>", "<|END_RESPONSE|>", "<|END_OF_TURN|>"],
     "{% for m in messages %}{{ '<|START|>' + m['role'] + ':' }}{% if m['role'] == 'assistant' and loop.last %}"
     "{{ '(thinking)' }}{% endif %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ '<|END_RESPONSE|>' }}"
     "{% endif %}{{ '<|END_OF_TURN|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|START|>assistant:' }}"
     "{% endif %}",
     [TURNS[1]["content"] + "<|END_RESPONSE|><|END_OF_TURN|>",
      "(thinking)" + TURNS[3]["content"] + "<|END_RESPONSE|><|END_OF_TURN|>"]),
    # Qwen3.5's no-thinking prompt opens an empty <think> block, which the whole writes in the last turn only:
    # earlier turns start after their role line.
    (["<|im_start|>", "<|im_end|>"],
     "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' and loop.last %}"
     "{{ '<think>\n\n</think>\n\n' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}",
     [TURNS[1]["content"] + "<|im_end|>", TURNS[3]["content"] + "<|im_end|>"]),
], ids=["two-end-tokens", "header-of-the-last-turn-only"])
def test_templates_that_render_the_last_turn_differently(special, template, learned):
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": special})
    ids, labels = chat_document(tok, template, TURNS)
    assert [tok.decode(run) for run in spans(ids, labels)] == learned


#: gpt-oss's shape: a turn ends with <|end|>, but the last one with <|return|> (the end of generation).
HARMONY = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|start|>assistant<|channel|>final<|message|>' + "
    "m['content'] }}{% if loop.last and not add_generation_prompt %}{{ '<|return|>' }}{% else %}{{ '<|end|>' }}"
    "{% endif %}{% else %}{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)


def test_an_earlier_turn_ends_at_the_token_that_ends_it_there():
    """The end-of-turn token is the one written after a turn that others follow (<|end|>), not the last
    turn's <|return|>."""
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                                                          "<|return|>"]})
    ids, labels = chat_document(tok, HARMONY, [SYSTEM] + TURNS)
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        "<|channel|>final<|message|>" + TURNS[1]["content"] + "<|end|>",
        "<|channel|>final<|message|>" + TURNS[3]["content"] + "<|return|>"]


#: GLM-4.5's chat template as it ships: no end-of-turn token; the model ends a turn by writing the next role's
#: token (<|user|>, <|observation|>), and generation also stops at EOS.
GLM4_MOE = (Path(__file__).parent / "fixtures" / "glm4_moe_chat_template.jinja").read_text()


def test_glm_turns_learn_the_token_that_ends_them():
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>", "<|system|>", "<|user|>",
                                                          "<|assistant|>", "<|observation|>"]})
    tok.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                    "</arg_value>", "<tool_response>", "</tool_response>"])
    messages = [*QWEN3_AGENT[:2], {**QWEN3_AGENT[2], "content": "7 silver keys"}, *QWEN3_AGENT[3:]]
    ids, labels = chat_document(tok, GLM4_MOE, messages)
    full = tok.apply_chat_template(messages, tokenize=False, chat_template=GLM4_MOE)
    assert ids == tok(full, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        "\n<think></think>\n<tool_call>count_keys\n<arg_key>where</arg_key>\n<arg_value>harbour</arg_value>\n"
        "</tool_call><|observation|>",  # its reasoning dropped: a user query follows
        "\n<think></think>\nThere are 7 keys.<|user|>",
        "\n<think>Count them.</think>\nTwo boats.<|endoftext|>",
    ]


#: gpt-oss's agent shape: a tool call ends with <|call|>, and an earlier turn's analysis is dropped once a final
#: answer follows, so the last turn's prompt is not a prefix of the whole; the last turn has two headers.
HARMONY_AGENT = (
    "{%- set ns = namespace(final=-1) -%}{%- for m in messages -%}{%- if m.role == 'assistant' and not m.tool_call -%}"
    "{%- set ns.final = loop.index0 -%}{%- endif -%}{%- endfor -%}{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}{%- if m.thinking and loop.index0 >= ns.final -%}"
    "<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{%- endif -%}"
    "{%- if m.tool_call -%}<|start|>assistant to={{ m.tool_call }}<|message|>{{ m.content }}<|call|>"
    "{%- else -%}<|start|>assistant<|channel|>final<|message|>{{ m.content }}"
    "{%- if loop.last and not add_generation_prompt -%}<|return|>{%- else -%}<|end|>{%- endif -%}{%- endif -%}"
    "{%- else -%}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def test_a_last_turn_with_two_headers_is_learned_from_the_first():
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                                                          "<|call|>", "<|return|>"]})
    messages = [{"role": "user", "content": "Count the keys."},
                {"role": "assistant", "tool_call": "functions.count", "thinking": "Use the tool.", "content": "{}"},
                {"role": "tool", "content": "7"},
                {"role": "assistant", "thinking": "The tool said 7.", "content": "There are 7 keys."}]
    ids, labels = chat_document(tok, HARMONY_AGENT, messages, loss_on="last_assistant")
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        "<|channel|>analysis<|message|>The tool said 7.<|end|><|start|>assistant<|channel|>final<|message|>"
        "There are 7 keys.<|return|>"]
    # The tool call's turn ends with <|call|>, not the <|end|> that ends a turn a user message follows, and its
    # analysis is dropped once a final answer follows: the rest of its render, through <|call|>, is found in the
    # whole (before, the trace was refused under all_assistant).
    ids, labels = chat_document(tok, HARMONY_AGENT, messages)
    assert [tok.decode(run) for run in spans(ids, labels)] == [
        " to=functions.count<|message|>{}<|call|>",
        "<|channel|>analysis<|message|>The tool said 7.<|end|><|start|>assistant<|channel|>final<|message|>"
        "There are 7 keys.<|return|>"]


@pytest.mark.parametrize("template, messages, match", [
    # The last turn is rendered differently and no special token ends a turn.
    ("{% for m in messages %}{{ m['role'] + ': ' }}{% if loop.last and m['role'] == 'assistant' %}{{ '!' }}"
     "{% endif %}{{ m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
     TURNS, r"renders messages\[:2\] differently .* data.loss_on=last_assistant"),
    # <|im_end|> ends an assistant turn only where a user message follows; here a tool message does, and the
    # first <|im_end|> after the turn ends the tool's message, which must not be learned.
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if loop.last and m['role'] == 'assistant' %}"
     "{{ '!' }}{% endif %}{{ m['content'] }}{% if m['role'] != 'assistant' or not loop.last and "
     "messages[loop.index0 + 1]['role'] == 'user' %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
     TOOL_TURNS + TURNS, r"renders messages\[:3\] differently .* data.loss_on=last_assistant"),
], ids=["no-token", "token-only-after-another-message"])
def test_a_turn_without_an_end_of_turn_token_is_refused(template, messages, match):
    tok = style_tokenizer("qwen2")
    with pytest.raises(ChatError, match=match) as err:
        chat_document(tok, template, messages)
    assert "\n" not in str(err.value)
    ids, labels = chat_document(tok, template, messages, loss_on="last_assistant")  # the fix the error names
    # Nothing ends the last turn in the template: EOS follows its text, learned, so the model learns to stop.
    learned = ("!" + messages[-1]["content"]).rstrip() + "<|endoftext|>"
    assert [tok.decode(run) for run in spans(ids, labels)] == [learned]


def test_template_exceptions_and_bad_messages_are_one_line():
    tok = style_tokenizer("gemma")
    with pytest.raises(ChatError, match="chat template fails on this conversation .System role not supported"):
        chat_document(tok, GEMMA, [SYSTEM] + TURNS)
    for messages, match in [([], "non-empty list"), ([{"role": "assitant", "content": "x"}], "rename it"),
                            ([{"role": "user", "content": 3}], '"content" string'),
                            ([{"role": "user", "content": "hi"}], "no \"assistant\" message"),
                            ("hello", "non-empty list")]:
        with pytest.raises(ChatError, match=match) as err:
            check_messages(messages)
        assert "\n" not in str(err.value)


# Record formats in a data file.


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_records_of_every_format_in_one_file(tmp_path):
    tok = make_tokenizer()
    path = write(tmp_path / "mixed.jsonl", [
        {"messages": TURNS},
        {"instruction": "Name an animal.", "input": "", "output": "The red fox."},
        {"instruction": "Name an animal.", "input": "in the garden", "output": "A grey cat."},
        {"prompt": "The red fox", "completion": " builds boats."},
        {"text": "A small robot paints old maps."},
    ])
    ds = load_dataset(path, tok, seq_len=256, chat_template="chatml", packing=False)
    assert ds.stats.records == {"messages": 1, "alpaca": 2, "completion": 1, "text": 1} and len(ds) == 5
    learned = [tok.decode(ds.input_ids[k][ds.labels[k] != IGNORE]) for k in range(5)]
    assert learned[0] == "The red fox builds wooden boats.<|im_end|>" + TURNS[3]["content"] + "<|im_end|>"
    assert learned[1] == "The red fox.<|im_end|>"  # alpaca as a user and an assistant turn of the template
    user = tok.decode(ds.input_ids[2][: int(ds.lengths[2])])
    assert "<|im_start|>user\nName an animal.\n\nin the garden<|im_end|>" in user
    assert learned[3] == " builds boats.<|endoftext|>"
    assert learned[4] == tok.decode(tok("A small robot paints old maps.")["input_ids"][1:]) + "<|endoftext|>"


def test_alpaca_without_a_template_uses_the_alpaca_prompt(tmp_path):
    tok = make_tokenizer()
    path = write(tmp_path / "a.jsonl", [{"instruction": "Name an animal.", "input": "in the garden", "output": "A cat."}])
    ds = load_dataset(path, tok, seq_len=256)
    text = tok.decode(ds.input_ids[0][: int(ds.lengths[0])])
    assert text.startswith("Below is an instruction") and "### Input:\nin the garden\n\n### Response:\nA cat." in text
    assert tok.decode(ds.input_ids[0][ds.labels[0] != IGNORE]) == "A cat.<|endoftext|>"


def test_conversational_prompt_completion_learns_the_completion(tmp_path):
    """TRL's conversational format: "prompt" and "completion" message lists (a string completion is one
    assistant message); only the completion's assistant turns are learned, as TRL does."""
    tok = make_tokenizer()
    prompt = [SYSTEM, TURNS[0], TURNS[1], TURNS[2]]
    path = write(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": [TURNS[3]]},
                                         {"prompt": prompt, "completion": TURNS[3]["content"]}])
    ds = load_dataset(path, tok, seq_len=256, chat_template="chatml", packing=False)
    whole = load_dataset(write(tmp_path / "m.jsonl", [{"messages": prompt + [TURNS[3]]}]), tok, seq_len=256,
                         chat_template="chatml", packing=False, loss_on="last_assistant")
    for k in range(2):
        assert ds.input_ids[k].tolist() == whole.input_ids[0].tolist()
        assert ds.labels[k].tolist() == whole.labels[0].tolist()
    assert tok.decode(ds.input_ids[0][ds.labels[0] != IGNORE]) == TURNS[3]["content"] + "<|im_end|>"


def test_sharegpt_conversations_read_as_messages(tmp_path):
    """ShareGPT's {"conversations": [{"from": "human", "value": ...}, ...]} (also under "messages"), as TRL reads
    it: the same document as the messages it stands for."""
    tok = make_tokenizer()
    speaker = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
    turns = [{"from": speaker[m["role"]], "value": m["content"]} for m in [SYSTEM, *TURNS]]
    # A turn's other keys come along: "weight": 0 (axolotl's mark) makes an answer context, not learned.
    weighted = [{**t, "weight": 0} if k == 2 else t for k, t in enumerate(turns)]
    path = write(tmp_path / "s.jsonl", [{"conversations": turns}, {"messages": turns}, {"messages": [SYSTEM, *TURNS]},
                                        {"conversations": weighted}])
    ds = load_dataset(path, tok, seq_len=256, chat_template="chatml", packing=False)
    assert ds.stats.records == {"messages": 4}
    for k in (0, 1):
        assert ds.input_ids[k].tolist() == ds.input_ids[2].tolist() and ds.labels[k].tolist() == ds.labels[2].tolist()
    assert ds.input_ids[3].tolist() == ds.input_ids[2].tolist()
    assert tok.decode(ds.input_ids[3][ds.labels[3] != IGNORE]) == TURNS[3]["content"] + "<|im_end|>"


def test_dolly_parts_and_weights_read_as_users_mean_them(tmp_path):
    """Dolly's instruction/context/response is an alpaca record; a content given as text parts is its text (a
    text-only template would print the list); an assistant message with "weight": 0 (axolotl's mark) is context."""
    tok = make_tokenizer()
    parts = [{"type": "text", "text": "Which animal builds "}, {"type": "text", "text": "wooden boats?"}]
    unlearned = {**TURNS[1], "weight": 0}
    path = write(tmp_path / "d.jsonl", [
        {"instruction": "Name an animal.", "context": "in the garden", "response": "A grey cat."},
        {"instruction": "Name an animal.", "input": "in the garden", "output": "A grey cat."},
        {"messages": [{"role": "user", "content": parts}, *TURNS[1:2]]},
        {"messages": TURNS[:2]},
        {"messages": [TURNS[0], unlearned, *TURNS[2:]]},
        {"messages": [TURNS[0], unlearned, TURNS[2], {**TURNS[3], "weight": None}]}])  # null: no weight, learned
    ds = load_dataset(path, tok, seq_len=256, chat_template="chatml", packing=False)
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert ds.input_ids[a].tolist() == ds.input_ids[b].tolist() and ds.labels[a].tolist() == ds.labels[b].tolist()
    assert tok.decode(ds.input_ids[4][ds.labels[4] != IGNORE]) == TURNS[3]["content"] + "<|im_end|>"
    assert TURNS[1]["content"] in tok.decode(ds.input_ids[4])


def test_text_and_completions_start_with_bos_where_the_tokenizer_adds_it(tmp_path):
    """Llama, Gemma and Mistral tokenizers start every text with BOS: a text or prompt/completion document does
    too (unlearned), so its first token is learned; a conversation keeps the one BOS its template writes."""
    from tokenizers.processors import TemplateProcessing

    tok = style_tokenizer("llama3")
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", bos)])
    assert tok("a")["input_ids"][0] == bos
    path = write(tmp_path / "d.jsonl", [{"text": "A small robot paints old maps."},
                                        {"prompt": "The red fox", "completion": " builds boats."},
                                        {"messages": TURNS},
                                        {"text": "<|begin_of_text|>A text that starts with it."}])
    ds = load_dataset(path, tok, seq_len=256, packing=False, chat_template="llama3", num_proc=1)
    eos = tok.eos_token_id
    text = tok("A small robot paints old maps.", add_special_tokens=False)["input_ids"]
    assert ds.input_ids[0][: int(ds.lengths[0])].tolist() == [bos, *text, eos]
    assert ds.labels[0][: int(ds.lengths[0])].tolist() == [IGNORE, *text, eos]  # the first token learned
    assert ds.input_ids[1][0] == bos and ds.labels[1][0] == IGNORE
    for k in (2, 3):  # a conversation's template writes it; a text that starts with it keeps the one
        doc = ds.input_ids[k][: int(ds.lengths[k])].tolist()
        assert doc.count(bos) == 1 and doc[0] == bos


@pytest.mark.parametrize("row, options, match", [
    ({"messages": TURNS}, {}, r'd.jsonl:2: "messages" records need a chat template .* set data.chat_template'),
    ({"messages": [{"role": "human", "content": "hi"}]}, {}, r"d.jsonl:2: messages\[0\].role 'human' is not one of"),
    ({"instruction": "x"}, {}, r'd.jsonl:2: an alpaca record needs "instruction" and "output" strings'),
    ({"question": "x", "answer": "y"}, {}, r"d.jsonl:2: expected a \"text\" field, .*\"messages\".*got keys \['answer'"),
    ([1, 2], {}, r"d.jsonl:2: expected a JSON object"),
    ({"prompt": 3, "completion": "x"}, {}, r'd.jsonl:2: "prompt" must be a string or a list of messages, got 3'),
    ({"prompt": "q", "completion": [TURNS[1]]}, {"chat_template": "chatml"},
     r'd.jsonl:2: a conversational record needs "prompt" and "completion" as lists of messages'),
    ({"prompt": [TURNS[0]], "completion": [TURNS[0]]}, {"chat_template": "chatml"},
     r'd.jsonl:2: "completion" has no "assistant" message'),
    ({"text": 5}, {}, r'd.jsonl:2: "text" must be a string, got 5'),
    ({"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}, {},
     r'd.jsonl:2: a preference record \("chosen"/"rejected"\): lora_dist fine-tunes on demonstrations'),
    ({"messages": [{"role": "developer", "content": "Be brief."}, *TURNS[:2]]}, {"chat_template": "chatml"},
     r"d.jsonl:2: messages\[0\].role 'developer' is not one of .*; rename it system"),
    ({"prompt": "Say hi", "completion": "Go away.", "label": False}, {},
     r'd.jsonl:2: an unpaired preference record \(KTO\'s "label"\)'),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, TURNS[1]]},
     {"chat_template": "chatml"}, r"d.jsonl:2: messages\[0\] \(user\) has a 'image' part; lora_dist fine-tunes on text"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     {"chat_template": "chatml"}, r"d.jsonl:2: turn 1: speaker 'bot' is not one of system, human"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
     {"chat_template": "chatml"}, r'd.jsonl:2: turn 1 \(gpt\) needs a "value" string, got None'),
    ({"messages": [TURNS[0], {**TURNS[1], "weight": 0.5}]}, {"chat_template": "chatml"},
     r"d.jsonl:2: messages\[1\].weight is 0.5: a message's weight is 0 \(context, not learned\) or 1"),
    ({"messages": [TURNS[0], {**TURNS[1], "weight": 0}]}, {"chat_template": "chatml"},
     r'd.jsonl:2: every "assistant" message has "weight": 0, so the conversation has nothing to learn'),
    ({"messages": [{**TURNS[0], "weight": None}, {**TURNS[1], "weight": 0}]}, {"chat_template": "chatml"},
     r'd.jsonl:2: every "assistant" message has "weight": 0'),  # a null weight is no weight: the user's is not learned
    ({"messages": [SYSTEM] + TURNS}, {"chat_template": "gemma"}, r"data.chat_template='gemma' is neither a shipped"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     {"chat_template": "chatml", "loss_on": "everything"}, r"d.jsonl:2: data.loss_on='everything' is not one of"),
])
def test_bad_records_name_the_file_line_and_fields(tmp_path, row, options, match):
    path = write(tmp_path / "d.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError, match=match) as err:
        load_dataset(path, make_tokenizer(), seq_len=64, **options)
    assert "\n" not in str(err.value)


def test_a_template_rejecting_a_record_names_its_line(tmp_path):
    tok = style_tokenizer("gemma")
    path = write(tmp_path / "d.jsonl", [{"messages": TURNS}, {"messages": [SYSTEM] + TURNS}])
    with pytest.raises(DataError, match=r"d.jsonl:2: the chat template fails .*System role not supported"):
        load_dataset(path, tok, seq_len=256)


def test_chat_template_from_a_file(tmp_path):
    tok = style_tokenizer("gemma")
    (tmp_path / "t.jinja").write_text(QWEN2)
    path = write(tmp_path / "d.jsonl", [{"messages": [SYSTEM] + TURNS}])
    ds = load_dataset(path, tok, seq_len=256, chat_template=str(tmp_path / "t.jinja"))
    assert tok.decode(ds.input_ids[0][: int(ds.lengths[0])]).startswith("<|im_start|>system\nYou answer")


def test_a_conversation_whose_start_the_template_fails_on_is_bounded_in_the_whole():
    """A template that fails on a start of a conversation it renders whole (Qwen3.5 and later fail on one without
    a user message; here, one ending with a tool call): a turn starts after the header the template writes after a
    user message and ends at the end-of-turn token the probes show, both found in the whole; where no header can
    be found, the error says which start failed, and suggests the last turn alone."""
    template = ("{% if messages[-1]['role'] == 'assistant' and messages[-1].tool_calls %}{{ raise_exception("
                "'A conversation cannot end with a tool call') }}{% endif %}{% for m in messages %}"
                "{{ '<|im_start|>' + m['role'] + '\n' }}{% if m.tool_calls %}{% for c in m.tool_calls %}"
                "{{ '<tool_call>' + c.function.name + '</tool_call>' }}{% endfor %}{% else %}{{ m['content'] }}"
                "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")
    call = {"type": "function", "function": {"name": "count_keys", "arguments": {}}}
    messages = [{"role": "user", "content": "Count the keys."},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "7 silver keys"}, {"role": "assistant", "content": "There are 7 keys."}]
    tok = style_tokenizer("qwen2")
    ids, labels = chat_document(tok, template, messages)
    assert [tok.decode(run) for run in spans(ids, labels)] == ["<tool_call>count_keys</tool_call><|im_end|>",
                                                               "There are 7 keys.<|im_end|>"]
    opening = [{"role": "assistant", "content": "Ahoy!"}, *TURNS[2:]]
    no_user = "{% if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}" \
        "{{ raise_exception('No user query found in messages.') }}{% endif %}"
    fails_alone = no_user + QWEN2
    for first in ([], [SYSTEM]):
        ids, labels = chat_document(tok, fails_alone, [*first, *opening])
        assert [tok.decode(run) for run in spans(ids, labels)] == ["Ahoy!<|im_end|>", TURNS[-1]["content"] +
                                                                   "<|im_end|>"]
    # no assistant header at all (LLaVA-NeXT's layout): the opening turn cannot be bounded
    headless = no_user + ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                          "' [/INST]' }}{% elif m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
                          "{% else %}{{ ' ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}")
    with pytest.raises(ChatError, match=r"renders the whole conversation but fails on messages\[:1\] \(No user query "
                                        r"found in messages.\), so .*; use data.loss_on=last_assistant or fix the "
                                        r"record \(a user message before the first assistant one\)"):
        chat_document(tok, headless, [SYSTEM, *opening])
    ids, labels = chat_document(tok, headless, [SYSTEM, *opening], loss_on="last_assistant")
    assert [tok.decode(run) for run in spans(ids, labels)] == [" " + TURNS[-1]["content"] + "<|im_end|>"]
    with pytest.raises(ChatError) as refused:  # what the template said survives pickling (a worker's error)
        chat_document(tok, fails_alone, [{"role": "assistant", "content": "Ahoy!"}])
    assert str(pickle.loads(pickle.dumps(refused.value))) == str(refused.value)
    assert str(refused.value).count("No user query found") == 1


def test_an_opening_greeting_that_llama_3_1_writes_into_its_tool_instructions_is_refused():
    """Llama 3.1 writes the first message after the system prompt into the user turn of its tool instructions,
    whatever its role, and fails on a start holding tools but no user message. The greeting then has no assistant
    header of its own: the conversation is refused (before the fix, that turn learned the whole user turn, from
    its header's ``user<|end_header_id|>`` on: the header search took ``<|start_header_id|>``, which the user's
    header starts with too, for the assistant's); its last turn alone trains."""
    import re

    template = trl_template("llama3_1")
    tok = style_tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(r"<\|[^|<>]{1,40}\|>", template)))})
    tools = [{"type": "function", "function": {"name": "count_keys", "description": "Count the keys.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [SYSTEM, {"role": "assistant", "content": "Ahoy!"}, *TURNS[2:]]
    with pytest.raises(ChatError, match=r"fails on messages\[:1\] \(Cannot put tools in the first user message"):
        chat_document(tok, template, messages, tools=tools)
    ids, labels = chat_document(tok, template, messages, tools=tools, loss_on="last_assistant")
    assert [tok.decode(run) for run in spans(ids, labels)] == [TURNS[-1]["content"].strip() + "<|eot_id|>"]
    ids, labels = chat_document(tok, template, messages)  # without tools it has its header: both turns
    assert [tok.decode(run) for run in spans(ids, labels)] == ["Ahoy!<|eot_id|>", TURNS[-1]["content"].strip() +
                                                               "<|eot_id|>"]


def _template_tokenizer(template: str):
    """A tokenizer holding the special tokens ``template`` writes (as the TRL template checks find them, and the
    turn markers of Gemma, SmolVLM and Mistral, which their tokenizers hold as special tokens)."""
    import re

    tok = style_tokenizer("qwen2")
    specials = set(re.findall(r"<\|[^|<>]{1,40}\|>|<｜[^｜]{1,40}｜>|<\|[a-z_]{1,30}>|<[a-z_]{1,20}\|>", template))
    specials |= {t for t in ("<start_of_turn>", "<end_of_turn>", "<end_of_utterance>", "</s>") if t in template}
    tok.add_special_tokens({"additional_special_tokens": sorted(specials)})
    return tok


@pytest.mark.parametrize("name", [*TEMPLATE, "glm", "harmony", *_trl_training_templates()])
def test_the_end_of_turn_tokens_are_those_learned_replies_end_with(name):
    """``end_of_turn_tokens`` (where ``lora-dist generate`` stops) are the tokens learned replies end with: on every
    conversation a template trains on, each learned assistant reply (a tool call aside: a model's generation config
    stops it) holds one of them, followed by nothing but special tokens and whitespace (Cohere's
    ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``: the model writes the first first), and each of them ends a reply.
    gpt-oss's replies before the last end with ``<|end|>``, which also ends the reasoning inside a last reply: no
    stop there."""
    from lora_dist.chat import end_of_turn_tokens

    if name in TEMPLATE:
        tok, template = style_tokenizer(name), TEMPLATE[name]
    elif name == "glm":
        tok, template = _template_tokenizer(GLM4_MOE), GLM4_MOE
        tok.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>"]})
    else:
        template = HARMONY_AGENT if name == "harmony" else trl_template(name)
        tok = _template_tokenizer(template)
    stops = end_of_turn_tokens(tok, template)
    assert stops and len(set(stops)) == len(stops)
    ended = set()
    for conv, messages in ORACLE_CONVERSATIONS.items():
        try:
            ids, labels = chat_document(tok, template, messages)
        except ChatError:
            continue
        replies = [m for m in messages if m["role"] == "assistant"]
        runs = spans(ids, labels)
        assert len(runs) == len(replies)
        for message, run in zip(replies, runs):
            if message.get("tool_calls") or (name in ("harmony", "gptoss_training") and message is not messages[-1]):
                continue
            at = next((k for k, t in enumerate(run) if t in stops), None)
            assert at is not None, (conv, tok.decode(run), tok.convert_ids_to_tokens(stops))
            assert not tok.decode(run[at + 1:], skip_special_tokens=True).strip(), (conv, tok.decode(run))
            ended.add(run[at])
    assert ended == set(stops) or name == "glm", tok.convert_ids_to_tokens(stops)  # GLM's <|observation|>: a call
