"""Records: what one line of data is, and which of its tokens carry the loss; chat templates.

A JSON record's format is detected from its fields (:func:`parse_record`): ``{"messages": [...]}``
first, then alpaca (``instruction``/``input``/``output``), ``{"text"}``, ``{"prompt", "completion"}``.
:func:`tokenize_record` makes it a document: ``(input_ids, labels)``, labels -100 where there is no loss.
Text is learned whole, a completion or an alpaca output after its prompt; each is followed by EOS
(learned too). Packing takes the label off every document's first token (nothing precedes it).
Alpaca records go through the chat template as a user and an assistant turn when there is one, and
otherwise through the Alpaca prompt.

A ``{"messages": [...]}`` record is rendered with a Jinja chat template (the tokenizer's own, or
``data.chat_template``) and tokenized once. The loss falls on each assistant message's tokens and
its end-of-turn token, never on system, user or tool text nor on role headers. No
``{% generation %}`` markers are needed: the turn boundaries are found by rendering the
conversation incrementally, as a server renders a prompt:

* an assistant turn starts where ``render(messages[:i], add_generation_prompt=True)`` ends
  (the prompt a server would send, header included);
* it ends where ``render(messages[:i+1])`` ends, less trailing whitespace (ChatML's and Gemma's
  ``"\\n"`` after the end-of-turn token is not generated, so it is not learned).

Where a template renders a turn differently once later messages follow it (Qwen3 drops the reasoning
of turns before the last user query and writes an empty ``<think>`` block only in the last turn;
gpt-oss drops an earlier turn's analysis once a final answer follows), those renders are not prefixes
of the whole. Each turn is then learned as the whole conversation renders it:

* it starts right after the first assistant header (what ``add_generation_prompt`` adds) between the
  previous message's content and its own; where that prompt prefills more than the whole writes
  (DeepSeek-R1 distills' ``<｜Assistant｜><think>\n``, Nemotron 3's ``<think>\n``), after its role line or its
  leading special tokens, if they are the assistant's own;
  Where the prompt adds no header (Gemma 4 after a tool result), right after what it writes after the
  previous message's content;
* it ends through its end-of-turn token: the special or added token the template writes right after
  an assistant message that the next message follows (``<|im_end|>``; gpt-oss's ``<|end|>``, not the
  ``<|return|>`` of a last turn), found before the next message's content; else (gpt-oss's tool call,
  ending with ``<|call|>``) where the longest tail of its own render ends in the whole.

A message's content is located by rendering the whole with that content replaced by a probe; the
tokens by rendering probe messages. A template that writes nothing after an assistant message (GLM:
the model ends a turn by writing the next role's token, ``<|user|>``, ``<|observation|>``) has each
turn learn that next token, and a conversation's last turn learn EOS, appended. A learned turn whose
text the template leaves out (a string content where it renders only parts, a tool call's name, the last
turn's reasoning before ``</think>``) is refused, never trained without it. A turn whose
boundaries cannot be found is refused in one line, never masked wrongly; the error suggests
``data.loss_on=last_assistant`` only where the last turn can be bounded.

Character boundaries become token boundaries through the tokenizer's offsets: a boundary that falls
inside a token (a merge across it) gives that token to the assistant span, as ``transformers``'
``return_assistant_tokens_mask`` does. ``tests/test_chat.py`` checks the masks with the templates of
Qwen2, Llama-3, Gemma, Mistral, Qwen3 (against transformers' ``{% generation %}`` masks on a marked
copy) and GLM-4.5, and gpt-oss's shapes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_dist.inputs import clip, excerpt, read_text

__all__ = ["ChatError", "FORMATS", "LOSS_ON", "ROLES", "Record", "TEMPLATES", "alpaca_messages", "alpaca_prompt",
           "chat_document", "check_messages", "configured_template", "end_of_turn_text", "end_of_turn_tokens",
           "parse_record", "render_chat", "reply_stops", "resolve_template", "token_ids", "tokenize_record"]

#: The label of a token without a loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT's speakers (``{"from", "value"}`` turns), as the roles they stand for.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}
LOSS_ON = ("all_assistant", "last_assistant")

#: Templates shipped by name for ``data.chat_template`` (base models without a template of their own).
TEMPLATES = {
    # ChatML, as Qwen2 and many fine-tunes use it (without Qwen2's default system prompt).
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama-3 Instruct's template (Llama-3 base tokenizers have its special tokens).
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
}

#: The Alpaca prompt, used for alpaca records when there is no chat template.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

#: Largest chat template file read (real ones are a few KB).
MAX_TEMPLATE_BYTES = 1 << 20


#: What a JSON record may hold, for the one-line error on one that holds none of it.
FORMATS = ('a "text" field, "prompt"/"completion", "instruction"/"input"/"output" (alpaca) '
           'or "messages" [{"role", "content"}, ...] (ShareGPT\'s "conversations" [{"from", "value"}, ...])')


class ChatError(ValueError):
    """A record, conversation or template that cannot be used (the caller adds the file and line)."""


class _TemplateFails(ChatError):
    """The chat template raised on a render; ``reason`` is what it said."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the chat template fails on this conversation ({reason}); fix the record or choose "
                         "another template (data.chat_template)")

    def __reduce__(self):
        return type(self), (self.reason,)


@dataclass
class Record:
    """One record of a data file: its format (``text``, ``completion``, ``alpaca``, ``messages``), fields, line."""

    kind: str
    fields: dict[str, Any]
    line: int = 0


def parse_record(row: Any, line: int = 0) -> Record:
    """The format of one JSON record, detected from its fields (messages, alpaca, text, prompt/completion).

    Raises:
        ChatError: none of the formats' fields, or a format's fields of the wrong type.
    """
    if not isinstance(row, dict):
        raise ChatError(f"expected a JSON object with {FORMATS}, got {excerpt(row, 60)}")
    row = {k: v for k, v in row.items() if v is not None}  # a null field is an absent one (as arrow writes it)
    tools = row.get("tools")
    if ("messages" in row or "conversations" in row or isinstance(row.get("prompt"), list)) and not isinstance(
            tools, (list, type(None))):
        raise ChatError(f'"tools" must be a list of tool definitions, got {excerpt(tools, 60)}')
    if "messages" in row or "conversations" in row:  # ShareGPT's name and turns are read as messages
        messages = sharegpt_messages(row["messages"] if "messages" in row else row["conversations"])
        return Record("messages", {"messages": check_messages(messages), "tools": tools}, line)
    if "chosen" in row and "rejected" in row:
        raise ChatError('a preference record ("chosen"/"rejected"): lora_dist fine-tunes on demonstrations, not '
                        'preferences; train on the chosen responses, e.g. {"prompt": ..., "completion": <chosen>}')
    if "instruction" in row or "output" in row:  # Dolly's "context" and "response" are its input and output
        values = [row.get("instruction"), row.get("input", row.get("context", "")), row.get("output", row.get("response"))]
        if not all(isinstance(v, str) for v in values):
            raise ChatError(f'an alpaca record needs "instruction" and "output" strings ("input" optional; Dolly\'s '
                            f'"context" and "response" are read as them), got keys {excerpt(sorted(row), 80)}')
        return Record("alpaca", dict(zip(("instruction", "input", "output"), values)), line)
    if isinstance(row.get("text"), str):
        return Record("text", {"text": row["text"]}, line)
    if isinstance(row.get("label"), bool) and "completion" in row:
        raise ChatError('an unpaired preference record (KTO\'s "label"): lora_dist fine-tunes on demonstrations; '
                        'keep the records labelled true, without "label"')
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise ChatError('a conversational record needs "prompt" and "completion" as lists of messages (or '
                            f'"completion" as a string), got prompt {excerpt(prompt, 40)}')
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
            raise ChatError('"completion" has no "assistant" message to learn from')
        messages = check_messages(prompt + completion)
        return Record("messages", {"messages": messages, "tools": tools, "first": len(prompt)}, line)
    if isinstance(completion, str):
        if prompt is not None and not isinstance(prompt, str):
            raise ChatError(f'"prompt" must be a string or a list of messages, got {excerpt(prompt, 60)}')
        return Record("completion", {"prompt": prompt or "", "completion": completion}, line)
    if "text" in row or "completion" in row:
        field = "text" if "text" in row else "completion"
        raise ChatError(f'"{field}" must be a string, got {excerpt(row[field], 60)}')
    raise ChatError(f"expected {FORMATS}; got keys {excerpt(sorted(row), 80)}")


def tokenize_record(record: Record, tokenizer, template: str | None,
                    loss_on: str = "all_assistant") -> tuple[list[int], list[int]]:
    """A record's document: ``(input_ids, labels)``, labels -100 where there is no loss.

    Args:
        record: from :func:`parse_record`.
        tokenizer: the model's tokenizer.
        template: the chat template (:func:`resolve_template`), or None.
        loss_on: for conversations, ``all_assistant`` or ``last_assistant``.

    Raises:
        ChatError: a conversation without a template, or as :func:`chat_document`.
    """
    f = record.fields
    if record.kind == "messages" or (record.kind == "alpaca" and template is not None):
        if template is None:
            raise ChatError('"messages" records need a chat template and the tokenizer in model.path has none; '
                            f"set data.chat_template ({', '.join(TEMPLATES)} or a Jinja file)")
        messages = f["messages"] if record.kind == "messages" else alpaca_messages(**f)
        return chat_document(tokenizer, template, messages, f.get("tools"), loss_on, first=f.get("first", 0))
    if record.kind == "alpaca":
        prompt, completion = alpaca_prompt(f["instruction"], f["input"]), f["output"]
    else:
        prompt, completion = f.get("prompt", ""), f.get("completion", f.get("text", ""))
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    head = bos_prefix(tokenizer)
    if head and (p or c)[:1] == head:  # the text starts with the BOS itself (Llama-2 style "<s>[INST] ...")
        head = []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return head + p + c + tail, [IGNORE] * (len(head) + len(p)) + c + tail


def bos_prefix(tokenizer) -> list[int]:
    """``[BOS]`` where the tokenizer starts every text with it (Llama, Gemma, Mistral: the model was trained so, and
    the first token of a document is then learned too), else ``[]`` (Qwen, GPT-2). A conversation's BOS is the
    chat template's to write."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    cached = _BOS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        cached = _BOS[id(tokenizer)] = (tokenizer, ids[:1] == [bos] and bare[:1] != [bos])
    return [bos] if cached[1] else []


#: Per tokenizer (by id, with the tokenizer to tell a reused id): whether it starts every text with BOS.
_BOS: dict[int, tuple[object, bool]] = {}


def resolve_template(tokenizer, chat_template: str = "", option: str = "data.chat_template") -> str | None:
    """The Jinja chat template to render ``messages`` records with.

    Args:
        tokenizer: the model dir's tokenizer.
        chat_template: ``data.chat_template``: ``""`` (the tokenizer's own), a name in :data:`TEMPLATES`,
            or the path of a Jinja file. An explicit value wins over the tokenizer's template.
        option: the caller's name for ``chat_template``, which an error names.

    Returns:
        The template source, or None when the tokenizer has none and none is configured.

    Raises:
        ChatError: an unknown name that is not a readable file.
    """
    if chat_template:
        if chat_template in TEMPLATES:
            return TEMPLATES[chat_template]
        path = Path(chat_template)
        if not path.is_file():
            raise ChatError(f"{option}={excerpt(chat_template)} is neither a shipped template "
                            f"({', '.join(TEMPLATES)}) nor a Jinja file; pass one of those names or a file path")
        return read_text(path, ChatError, "the chat template", max_bytes=MAX_TEMPLATE_BYTES)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    return own or None


def configured_template(chat_template: str) -> str | None:
    """The template ``data.chat_template`` names (a shipped name or a Jinja file): what training rendered with, so
    what an adapter and a merged export carry as ``chat_template.jinja``; None for ``""``, the tokenizer's own, which
    the base's tokenizer files carry already.

    Raises:
        ChatError: an unknown name that is not a readable file.
    """
    return resolve_template(None, chat_template) if chat_template else None


def alpaca_prompt(instruction: str, input: str) -> str:
    """The Alpaca prompt of an instruction (and optional input), ending with ``### Response:\\n``."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def alpaca_messages(instruction: str, input: str, output: str) -> list[dict]:
    """An alpaca record as a user turn (instruction, a blank line, input) and an assistant turn."""
    user = f"{instruction}\n\n{input}" if input else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def sharegpt_messages(turns: Any) -> Any:
    """ShareGPT turns (``{"from": "human", "value": ...}``) as messages (``{"role": "user", "content": ...}``), as
    TRL reads them; anything else as it is.

    Raises:
        ChatError: a speaker that is none of :data:`SHAREGPT_ROLES`.
    """
    if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and "from" in t and "role" not in t for t in turns):
        return turns
    messages = []
    for k, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise ChatError(f"turn {k}: speaker {excerpt(turn['from'], 40)} is not one of "
                            f"{', '.join(SHAREGPT_ROLES)}; rename it in the data")
        value = turn.get("value")
        if not (isinstance(value, (str, list)) or (value is None and turn.get("tool_calls"))):
            raise ChatError(f'turn {k} ({turn["from"]}) needs a "value" string, got {excerpt(value, 80)}')
        # the turn's other keys too: its "weight" (0: context, not learned), "tool_calls", "name"...
        messages.append({**{k: v for k, v in turn.items() if k not in ("from", "value")},
                         "role": role, "content": turn.get("value")})
    return messages


def check_messages(messages: Any) -> list[dict]:
    """``messages`` if it is a conversation lora_dist can learn from.

    Raises:
        ChatError: not a non-empty list of ``{"role", "content"}`` objects, a role outside
            :data:`ROLES`, a content that is not a string (or missing without ``tool_calls``), or no
            assistant message.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatError('"messages" must be a non-empty list of {"role", "content"} objects, got '
                        f"{excerpt(messages, 80)}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatError(f'messages[{k}] must be an object with "role" and "content", got {excerpt(m, 80)}')
        if m["role"] not in ROLES:
            fix = ("rename it system (many chat templates drop a role they do not know)" if m["role"] == "developer"
                   else "rename it (e.g. human -> user, gpt -> assistant)")
            raise ChatError(f"messages[{k}].role {excerpt(m['role'], 40)} is not one of {', '.join(ROLES)}; {fix}")
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
            raise ChatError(f'messages[{k}] ({m["role"]}) needs a "content" string, got {excerpt(content, 80)}')
        if m.get("weight") not in (None, 0, 1):  # null: absent (a table's JSON writes it where a row has none)
            raise ChatError(f"messages[{k}].weight is {excerpt(m['weight'], 40)}: a message's weight is 0 (context, "
                            "not learned) or 1 (learned), as axolotl reads it; set one of those")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError('the conversation has no "assistant" message to learn from; add one or drop the record')
    if not any(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in messages):
        raise ChatError('every "assistant" message has "weight": 0, so the conversation has nothing to learn; '
                        "set one's weight to 1 or drop the record")
    return [{**m, "content": _text(m["content"], k, m["role"])} if isinstance(m.get("content"), list) else m
            for k, m in enumerate(messages)]


def _text(parts: list, k: int, role: str) -> str:
    """A content given as parts (``[{"type": "text", "text": ...}, ...]``, OpenAI's form) as the text they hold: a
    text-only chat template would print the list itself.

    Raises:
        ChatError: a part that is not text (lora_dist fine-tunes on text).
    """
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatError(f"messages[{k}] ({role}) has a {excerpt(kind or part, 40)} part; lora_dist fine-tunes on "
                            'text: keep its {"type": "text", "text": ...} parts only')
        texts.append(part["text"])
    return "".join(texts)


def chat_document(tokenizer, template: str, messages: list[dict], tools: list | None = None,
                  loss_on: str = "all_assistant", offsets: bool | None = None,
                  first: int = 0) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation, the loss on assistant turns only.

    Args:
        tokenizer: the model's tokenizer (fast tokenizers map boundaries through offsets).
        template: the Jinja chat template (:func:`resolve_template`).
        messages: a conversation (:func:`check_messages`).
        tools: the record's ``tools``, passed to the template.
        loss_on: ``all_assistant`` or ``last_assistant``.
        offsets: map boundaries through offsets (default: when the tokenizer is fast) or by tokenizing
            each prefix (any tokenizer).
        first: learn the assistant turns from ``messages[first]`` on (a conversational prompt/completion
            record: its completion's).

    Returns:
        ``(input_ids, labels)``: the whole conversation tokenized once, without extra special tokens
        (the template writes BOS where the model wants one; EOS follows where the template writes no
        end-of-turn token); ``labels`` are the ids on assistant spans and ``-100`` elsewhere.

    Raises:
        ChatError: the template fails on the conversation, or an assistant turn's boundaries cannot be
            found (see the module docstring).
    """
    if loss_on not in LOSS_ON:
        raise ChatError(f"data.loss_on={excerpt(loss_on, 40)} is not one of {', '.join(LOSS_ON)}")
    full = render_chat(tokenizer, template, messages, tools, generation_prompt=False)
    _check_context_kept(tokenizer, template, messages, tools, full)
    # (an assistant message with "weight": 0, as axolotl marks one, is context, not learned)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first and m.get("weight", 1) != 0]
    try:
        spans, learned, stop = _assistant_spans(tokenizer, template, messages, tools, full,
                                                turns[-1:] if loss_on == "last_assistant" else turns)
    except _Unbounded as e:
        fix = e.fix
        if loss_on == "all_assistant":
            try:  # suggest the last turn alone only where it can be bounded
                _assistant_spans(tokenizer, template, messages, tools, full, turns[-1:])
                fix = "use data.loss_on=last_assistant or " + fix
            except _Unbounded:
                pass
        raise ChatError(f"{e}; {fix}") from None
    _check_text_kept(messages, learned, full)
    if stop is not None:  # the last turn ends the conversation and the template writes no end-of-turn token:
        full = full.rstrip()  # EOS follows the turn's text, as the model is to write it
    ids, bounds = _tokenize(tokenizer, full, [c for span in spans for c in span], offsets)
    labels = [IGNORE] * len(ids)
    for s, e in zip(bounds[::2], bounds[1::2]):
        labels[s:e] = ids[s:e]
    if stop is not None:
        ids, labels = ids + [stop], labels + [stop]
    return ids, labels


def _tool_names(message: dict) -> list[str]:
    """The names of the tools an assistant message calls (OpenAI's ``tool_calls``, ``function.name``)."""
    calls = message.get("tool_calls")
    functions = [c.get("function", c) for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    return [f["name"] for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]]


def _check_context_kept(tokenizer, template: str, messages: list[dict], tools: list | None, full: str) -> None:
    """Refuse a conversation whose system, user or tool message the template leaves out of its render (Mistral
    v0.3's writes the system message only into a last user message, so a whole conversation has none; gpt-oss's and
    Qwen3-VL's drop a system message after the first; a template may skip a role it does not know, as Phi-3's does
    a tool result): the turns would be learned without it, silently (an answer quoting a tool result it never
    saw). A message whose text the render rewrites (SmolLM3 and Nemotron take out
    ``/think``, ``/no_think``) is kept where a probe put in its place is rendered."""
    for k, m in enumerate(messages):
        content = m.get("content") if m["role"] in ("system", "user", "tool") else None
        text = content.strip() if isinstance(content, str) else ""
        if not text or text in full or PROBE[1] in _render_with(tokenizer, template, messages, k, PROBE[1], tools):
            continue
        why = fix = ""
        user = next((n for n in messages if n["role"] == "user"), None)
        if k == 0 and m["role"] == "system" and user is not None and \
                text in render_chat(tokenizer, template, [m, user], tools, generation_prompt=False):
            why = (" (as Mistral v0.3's, it writes a system message only into a last user message, and a "
                   "conversation to learn from ends with an assistant message)")
            fix = "merge it into the first user message, or "
        raise ChatError(f"the chat template leaves the {m['role']} message messages[{k}] ({excerpt(text, 40)}) out of "
                        f"the conversation it renders{why}, so the assistant turns would be learned without it; "
                        f"{fix}set data.chat_template to a template that renders it (docs/data.md)")


def _check_text_kept(messages: list[dict], learned: list[tuple[int, int, int]], full: str) -> None:
    """Refuse a conversation whose learned turn lacks text of its message: its answer (a template that renders an
    assistant's text only from content parts drops a string), the name of a tool it calls (DeepSeek-R1 distills'
    template drops the calls of a message with content), or, in the conversation's last assistant message, the
    reasoning before ``</think>`` (the distills' template drops it from every turn). It would be trained without
    it, silently. Earlier turns' reasoning may be dropped by design (Qwen3's history)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is not None and any(m["role"] == "user" for m in messages[last + 1:]):
        last = None  # a user message follows: its reasoning is history, which templates may drop (Qwen3, GLM)
    for i, start, end in learned:
        calls = _tool_names(messages[i])
        for name in calls:
            if name not in full[start:end]:
                raise ChatError(f"the chat template leaves the tool call {excerpt(name, 40)} of messages[{i}] out of "
                                "the assistant turn it renders (it renders no tool_calls; none beside a content, as "
                                "DeepSeek-R1 distills'; or, as DeepSeek-V3's for a call after a tool result, the call "
                                "inside the tool outputs, where no generation prompt leads), so it would be trained "
                                "without it; set data.chat_template to a template that renders tool calls as "
                                "assistant turns (docs/data.md)")
        content = messages[i].get("content")
        if not isinstance(content, str) or calls:  # a turn that calls tools may be rendered as its calls alone
            continue  # (Llama 3.1 writes the call's JSON in place of any text)
        reasoning, answer = content.rsplit("</think>", 1) if "</think>" in content else ("", content)
        reasoning = reasoning.split("<think>")[-1].strip() if i == last else ""
        for what, text in (("text", answer.strip()), ("reasoning (before </think>)", reasoning)):
            if text and text not in full[start:end]:
                fix = ("for DeepSeek-R1 distills, TRL's deepseek_r1_distill_training.jinja; " if what != "text" else "")
                raise ChatError(f"the chat template leaves the {what} of messages[{i}] ({excerpt(text, 40)}) out of "
                                f"the assistant turn it renders, so it would be trained without it; set "
                                f"data.chat_template to a template that renders it ({fix}see docs/data.md)")


class _Unbounded(ChatError):
    """An assistant turn whose boundaries cannot be found (the caller adds the fix: ``fix``, or that a template
    rendering earlier turns the same way would do)."""

    def __init__(self, message: str, fix: str = "set data.chat_template to a template that renders earlier turns "
                                                 "the same way"):
        self.fix = fix
        super().__init__(message)


def _assistant_spans(tokenizer, template: str, messages: list[dict], tools: list | None, full: str,
                     turns: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]], int | None]:
    """The character spans of ``full`` that assistant turns ``turns`` are learned on, each turn with its span
    (``(i, start, end)``, an empty one too), and the token to learn after the whole (EOS, where the last turn ends
    the conversation and the template writes no end-of-turn token after it; else None)."""
    special = _special_tokens(tokenizer)
    silent = None  # whether the template writes nothing after an assistant message that ends a conversation
    spans, learned, stop = [], [], None
    for i in turns:
        context, following = messages[:i], messages[i + 1] if i + 1 < len(messages) else None
        try:
            prompt = render_chat(tokenizer, template, context, tools, generation_prompt=True)
        except _TemplateFails as e:  # the conversation opens with this turn (transformers renders no empty one), or
            # the template fails on its start (Qwen3.5: a conversation without a user message) though the whole renders
            prompt, failed = None, e
        if prompt is not None and full.startswith(prompt):
            start = len(prompt)
        else:  # an earlier turn renders differently once this one follows (Qwen3 drops its reasoning)
            start = _start_of_turn(tokenizer, template, messages, i, tools, full, prompt, spans[-1][1] if spans else 0)
            if start is None and prompt is None and i:
                raise _fails_on_start(i, failed)
            if start is None and prompt is None:
                raise _Unbounded("the conversation opens with an assistant message and no assistant header the "
                                 "chat template writes after a user message stands before it")
            if start is None:
                raise _Unbounded(_not_a_prefix(i, prompt, full, "no assistant header stands before the turn there"))
        if silent is None:
            try:
                silent = not _after_last_turn(tokenizer, template, context, tools)
            except ChatError:
                silent = False
        try:
            through = render_chat(tokenizer, template, messages[: i + 1], tools, generation_prompt=False)
        except _TemplateFails as e:  # the whole renders, its start does not: the end-of-turn token may tell the end
            through, failed = None, e
        if through is not None and full.startswith(through):
            end = max(start, len(through.rstrip()))
            if silent and following is not None:  # GLM: the model stops by writing the next message's role token
                end += len(_leading(special, full[end:]))
        else:  # the turn renders differently once others follow it (Qwen3 drops its reasoning)
            end = _end_of_turn(tokenizer, template, messages, i, tools, full, start, special)
            if end is None and through is not None:  # no end-of-turn token (gpt-oss's tool call ends with <|call|>)
                end = _end_by_tail(tokenizer, template, messages, i, tools, full, through, start, special)
            if end is None and through is None:
                raise _fails_on_start(i + 1, failed)
            if end is None:
                raise _Unbounded(_not_a_prefix(i + 1, through, full, "no end-of-turn token ends the turn there"))
        if end > start:
            spans.append((start, end))
        learned.append((i, start, end))
        if silent and following is None:
            stop = tokenizer.eos_token_id
    return spans, learned, stop


def render_chat(tokenizer, template: str, messages: list[dict], tools: list | None = None,
                generation_prompt: bool = False) -> str:
    """A conversation as training renders it with ``template``: through ``tokenizer.apply_chat_template``, each
    string content handed as one text part where the template renders text only from parts (SmolVLM, Idefics3
    print nothing of a string). ``generation_prompt`` appends the assistant header a reply follows. Its callers
    tokenize the text without extra special tokens (the template writes BOS where the model wants one).

    Raises:
        ChatError: the template fails on the conversation, or renders no text.
    """
    if _renders_parts_only(tokenizer, template):  # each text as the one part of its content (SmolVLM, LLaVA-NeXT)
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str)
                    else m for m in messages]
    return _render_as_given(tokenizer, template, messages, tools, generation_prompt)


#: template -> whether it renders a text only from content parts (a property of the template, asked once)
_PARTS_ONLY: dict[str, bool] = {}


def _renders_parts_only(tokenizer, template: str) -> bool:
    """Whether the template renders a message's text only from a list of content parts (``[{"type": "text",
    "text": ...}]``, a vision-language model's: SmolVLM's and Idefics3's print nothing of a string)."""
    if template not in _PARTS_ONLY:
        try:
            text = _render_as_given(tokenizer, template, [{"role": "user", "content": PROBE[1]}], None, False)
        except ChatError:  # LLaVA-NeXT's indexes the content's first part
            text = ""
        try:
            parts = [{"role": "user", "content": [{"type": "text", "text": PROBE[1]}]}]
            _PARTS_ONLY[template] = PROBE[1] not in text and PROBE[1] in _render_as_given(tokenizer, template, parts,
                                                                                         None, False)
        except ChatError:
            _PARTS_ONLY[template] = False
    return _PARTS_ONLY[template]


def _render_as_given(tokenizer, template: str, messages: list[dict], tools: list | None,
                     generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError (raise_exception), UndefinedError, TypeError...
        raise _TemplateFails(clip(" ".join(str(e).split()), 200)) from None
    if not isinstance(text, str):
        raise ChatError(f"the chat template rendered {type(text).__name__}, not text")
    return text


#: The contents of the probe messages rendered to find how a template ends an assistant turn.
PROBE = ("LoraDistAssistantProbe", "LoraDistNextProbe")


def _special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special and added tokens, longest first."""
    tokens = {*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens}
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _leading(special: list[str], text: str) -> str:
    """The special or added token ``text`` starts with ("" if none)."""
    return next((t for t in special if text.startswith(t)), "")


def _leading_tokens(special: list[str], text: str) -> str:
    """The special or added tokens ``text`` starts with, one after the other, whole ("" if none)."""
    end = 0
    while token := _leading(special, text[end:]):
        end += len(token)
    return text[:end]


def _after_probe(tokenizer, template: str, context: list[dict], following: dict | None,
                 tools: list | None) -> str:
    """What the template writes after an assistant message's content when it follows ``context``: through the
    end of the conversation, or up to ``following`` (a message, its content replaced), inclusive."""
    probe = [*context, {"role": "assistant", "content": PROBE[0]}]
    if following is not None:
        probe.append({**following, "content": PROBE[1]})
    text = render_chat(tokenizer, template, probe, tools, False)
    at = text.rfind(PROBE[0])
    return text[at + len(PROBE[0]):] if at >= 0 else ""


def _after_last_turn(tokenizer, template: str, context: list[dict], tools: list | None) -> str:
    """What the template writes after an assistant message that follows ``context`` and ends the conversation, less
    surrounding whitespace: "" where it writes nothing, and the model learns EOS there instead."""
    return _after_probe(tokenizer, template, context, None, tools).strip()


def _start_of_turn(tokenizer, template: str, messages: list[dict], i: int, tools: list | None, full: str,
                   prompt: str | None, after: int) -> int | None:
    """Where assistant turn ``messages[i]`` starts in ``full`` when its prompt is not a prefix of it: right after
    the first assistant header (what ``add_generation_prompt`` adds to the prompt, ``<|im_start|>assistant\\n``)
    between the previous message's content and this turn's, and not before ``after``. ``prompt`` None: the
    template renders no prompt for this turn (the conversation opens with it; Qwen3.5 fails on a start without a
    user message): the header is the one added after a user message (a default system prompt before it is not
    learned). None when there is no such header, or the previous message's content cannot be located.
    """
    try:
        if prompt is None:
            probe = [{"role": "user", "content": PROBE[1]}]
            bare = render_chat(tokenizer, template, probe, tools, generation_prompt=False)
            prompt = render_chat(tokenizer, template, probe, tools, generation_prompt=True)
        else:
            bare = render_chat(tokenizer, template, messages[:i], tools, generation_prompt=False)
        lower = _inside_content(tokenizer, template, messages, i - 1, tools, full) if i else 0
        upper = _content_at_most(tokenizer, template, messages, i, tools, full)
    except ChatError:
        return None
    header = _generation_header(prompt, bare, _special_tokens(tokenizer))
    if lower is None:
        return None
    if i:  # past the previous content's second half where it is written as it is: a header inside it (a user
        # quoting "<｜Assistant｜>") is text, never where the turn starts
        previous = messages[i - 1]["content"]
        rest = previous[len(previous) // 2:]
        if full.startswith(rest, lower):
            lower += len(rest)
    if not header.strip():  # the prompt adds no header (Gemma 4 goes on in the model's turn after a tool result)
        return _start_after_previous(tokenizer, messages, i, full, prompt, lower, after, upper)
    headers = [header]
    if header in full:  # one the whole writes for its last turn only (Qwen3.5's empty <think> block): earlier
        # turns start after its first lines (the role's)
        headers += [header[:cut] for cut in range(len(header) - 1, 0, -1)
                    if header[cut - 1] == "\n" and header[:cut].strip()]
    # The prompt may prefill more than the whole writes for this turn (DeepSeek-R1 distills' "<｜Assistant｜><think>\n"
    # before a turn without reasoning; Nemotron 3's "<|im_start|>assistant\n<think>\n" where such a turn renders
    # "<think></think>"): the turn starts after the header's role line, or its leading special tokens, where that is
    # the assistant's own (not ChatML's <|im_start|>, which a user message's header starts with too; not at all
    # where the user's header cannot be told: Llama 3.1 fails on a start holding tools but no user message).
    line = header[:header.find("\n") + 1]
    user = _user_header(tokenizer, template, messages[:i], tools)
    leading = _leading_tokens(_special_tokens(tokenizer), header) if user else ""
    headers += [h for h in (line, leading) if h.strip() and h not in headers and h not in user]
    for h in headers:
        at = full.find(h, max(lower, after), upper)
        if at >= 0:
            return at + len(h)
    return None


def _generation_header(prompt: str, bare: str, special: list[str]) -> str:
    """What a generation prompt adds to the render ``bare`` of the same messages: the tail of ``prompt`` past it,
    or past what is left of it once the special tokens it ends with are taken off, one at a time (Phi-3 ends a
    conversation with its EOS, which a generation prompt replaces with the assistant header). "" where neither
    is a prefix of ``prompt``."""
    while not prompt.startswith(bare):
        token = next((t for t in special if bare.endswith(t)), "")
        if not token:
            return ""
        bare = bare[: -len(token)]
    return prompt[len(bare):]


def _start_after_previous(tokenizer, messages: list[dict], i: int, full: str, prompt: str, lower: int, after: int,
                          upper: int) -> int | None:
    """Where assistant turn ``messages[i]`` starts in ``full`` when its prompt adds no header: right after what the
    prompt writes after the previous message's content (Gemma 4's ``...<|"|>}<tool_response|>``), found in
    ``full`` after that content (``lower``), if it ends with a special or added token. None otherwise."""
    previous = messages[i - 1].get("content") if i else None
    at = prompt.rfind(previous) if isinstance(previous, str) and previous else -1
    anchor = prompt[at + len(previous):] if at >= 0 else ""
    if not anchor.strip() or not any(anchor.endswith(t) for t in _special_tokens(tokenizer)):
        return None
    found = full.find(anchor, max(lower, after), upper)
    return found + len(anchor) if found >= 0 else None


def _user_header(tokenizer, template: str, context: list[dict], tools: list | None) -> str:
    """What the template writes before a user message's content when it follows ``context`` ("" where it cannot be
    told)."""
    try:
        bare = render_chat(tokenizer, template, context, tools, False) if context else ""
        text = render_chat(tokenizer, template, [*context, {"role": "user", "content": PROBE[1]}], tools, False)
    except ChatError:
        return ""
    return text[len(bare):text.find(PROBE[1])] if text.startswith(bare) and PROBE[1] in text else ""


def _end_of_turn(tokenizer, template: str, messages: list[dict], i: int, tools: list | None, full: str,
                 start: int, special: list[str]) -> int | None:
    """Where assistant turn ``messages[i]``, starting at ``full[start]``, ends, through its end-of-turn token.

    For a turn the template renders differently once later messages follow it (Qwen3 drops an
    earlier turn's reasoning), so that ``render(messages[:i+1])`` is not a prefix of the whole. The
    end-of-turn token is what the template writes right after an assistant message that the next message
    follows: as much of what it writes after a last one as both share (``<|im_end|>``; Cohere's two tokens),
    else the leading special or added token (gpt-oss's ``<|end|>``, where a last turn ends with ``<|return|>``;
    GLM's next role token, where nothing ends a last turn), found by rendering probe messages after
    ``messages[:i]``. It must come before the next message's content. Returns None when there is no such
    token, or ``full`` holds none there.
    """
    following = messages[i + 1]
    try:
        followed = _after_probe(tokenizer, template, messages[:i], following, tools)
        try:
            last = _after_probe(tokenizer, template, messages[:i], None, tools).rstrip()
        except ChatError:  # no conversation ends there (Qwen3.5: none without a user message): the leading token
            last = ""
        bound = _inside_content(tokenizer, template, messages, i + 1, tools, full)
        if bound is None:
            bound = _content_at_most(tokenizer, template, messages, i + 1, tools, full)
    except ChatError:  # the template refuses the probes (gpt-oss: a tool message after no tool call)
        return None
    marker = _leading_tokens(special, followed[:_diverge(followed, last)]) or _leading(special, followed)
    found = full.find(marker, start, bound) if marker else -1
    return found + len(marker) if found >= 0 else None


def end_of_turn_tokens(tokenizer, template: str) -> list[int]:
    """The tokens training teaches a model to end its reply with under ``template``, where a decoder stops: the
    first special or added token the template writes after an assistant message that ends a conversation
    (``<|im_end|>``, ``<|eot_id|>``, gpt-oss's ``<|return|>``: not its ``<|end|>``, which also ends the reasoning
    inside a reply); where it writes none there, EOS, which :func:`chat_document` then appends, and the role token
    each earlier turn learns to end with (GLM's ``<|user|>``, ``<|observation|>``).

    Returns:
        Token ids, without repeats; ``[]`` where the template refuses the probe conversation or writes text, not a
        token, after a last reply.
    """
    special = _special_tokens(tokenizer)
    context = [{"role": "user", "content": PROBE[1]}]
    try:
        last = _after_last_turn(tokenizer, template, context, None)
    except ChatError:
        return []
    if last:
        token = _leading(special, last)
        return [tokenizer.convert_tokens_to_ids(token)] if token else []
    markers = []
    for role in ("user", "tool"):  # as _assistant_spans learns them: the token leading what follows the turn
        try:
            markers.append(_leading(special, _after_probe(tokenizer, template, context, {"role": role}, None)))
        except ChatError:  # a template that takes no such message there
            pass
    ids = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(m) for m in markers if m)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def end_of_turn_text(tokenizer, template: str) -> str:
    """The text a reply learns to end with where ``template`` writes text, not a token, after a last reply (ChatML's
    ``<|im_end|>`` on a vocabulary without it: several ordinary tokens): where a decoder stops by string, as
    ``generate(stop_strings=...)`` does. ``""`` where it writes a token (:func:`end_of_turn_tokens`), nothing (EOS)
    or refuses the probe conversation."""
    try:
        last = _after_last_turn(tokenizer, template, [{"role": "user", "content": PROBE[1]}], None)
    except ChatError:
        return ""
    return "" if _leading(_special_tokens(tokenizer), last) else last


def token_ids(eos_token_id: int | list[int] | None) -> list[int]:
    """A generation config's ``eos_token_id`` (an id, a list of them or None) as a list."""
    return [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def reply_stops(tokenizer, template: str | None, eos_token_id: int | list[int] | None) -> list[int]:
    """The tokens a decoder stops a reply at: a generation config's ``eos_token_id``, then what training taught a
    reply to end with, the template's end-of-turn tokens (:func:`end_of_turn_tokens`), or EOS after a raw text
    (``template`` None); without repeats."""
    given = token_ids(eos_token_id)
    learned = [tokenizer.eos_token_id] if template is None else end_of_turn_tokens(tokenizer, template)
    return list(dict.fromkeys(i for i in [*given, *learned] if i is not None))


def _end_by_tail(tokenizer, template: str, messages: list[dict], i: int, tools: list | None, full: str,
                 through: str, start: int, special: list[str]) -> int | None:
    """Where assistant turn ``messages[i]``, starting at ``full[start]``, ends, where the conversation rendered
    through it (``through``) differs from the whole only before the turn's own text (gpt-oss drops a tool call's
    analysis once a final answer follows; the call itself, ``... to=functions.f<|channel|>commentary
    json<|message|>{...}<|call|>``, is the same): the end of the longest tail of ``through`` that the whole holds
    between the turn's start and the next message's content, if that tail holds the turn's text (its content, or
    each tool call's name) and ends with a special or added token (what ends the turn: the model learns to stop).
    None otherwise."""
    text = through.rstrip()
    if not any(text.endswith(t) for t in special):
        return None
    message = messages[i]
    own = [t for t in [*_tool_names(message), message.get("content")] if isinstance(t, str) and t.strip()]
    try:
        bound = _content_at_most(tokenizer, template, messages, i + 1, tools, full)
    except ChatError:
        return None
    window = full[start:bound]

    def found(k: int) -> bool:  # a tail found is found shorter too: the shortest k found is the longest tail
        return text[k:] in window

    lo, hi = _diverge(text, full), len(text)
    if not own or lo >= hi or not found(hi - 1):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if found(mid) else (mid + 1, hi)
    tail = text[lo:]
    if not all(t.strip() in tail for t in own):
        return None
    return start + window.rfind(tail) + len(tail)


def _inside_content(tokenizer, template: str, messages: list[dict], k: int, tools: list | None,
                    full: str) -> int | None:
    """A position inside ``messages[k]``'s content in ``full``: where a probe inserted in its middle appears, if
    inserting it changes nothing else in the render (a template may read the content: Qwen3 takes a user message
    wrapped in ``<tool_response>`` for a tool result). None for a content that is not text, or another render."""
    content = messages[k].get("content")
    if not isinstance(content, str):
        return None
    middle = len(content) // 2
    other = _render_with(tokenizer, template, messages, k, content[:middle] + PROBE[0] + content[middle:], tools)
    at = other.find(PROBE[0])
    return at if at >= 0 and other == full[:at] + PROBE[0] + full[at:] else None


def _content_at_most(tokenizer, template: str, messages: list[dict], k: int, tools: list | None, full: str) -> int:
    """A position at or before where ``messages[k]``'s content starts in ``full``: where the whole render with that
    content replaced by a probe first differs (earlier where the template reads the content)."""
    return _diverge(full, _render_with(tokenizer, template, messages, k, PROBE[0], tools))


def _render_with(tokenizer, template: str, messages: list[dict], k: int, content: str, tools: list | None) -> str:
    """The whole conversation rendered with ``messages[k]``'s content replaced by ``content``."""
    return render_chat(tokenizer, template, [*messages[:k], {**messages[k], "content": content}, *messages[k + 1:]],
                       tools, False)


def _diverge(a: str, b: str) -> int:
    """The first position where ``a`` and ``b`` differ (the shorter one's length where one starts the other)."""
    n, k = min(len(a), len(b)), 0
    while k < n and a[k:k + 4096] == b[k:k + 4096]:  # compared in C, a block at a time
        k += 4096
    return next((j for j in range(k, min(k + 4096, n)) if a[j] != b[j]), n)


def _fails_on_start(k: int, e: _TemplateFails) -> _Unbounded:
    return _Unbounded(f"the chat template renders the whole conversation but fails on messages[:{k}] ({e.reason}), "
                      "so the turn's boundaries cannot be found",
                      fix="fix the record (a user message before the first assistant one) or choose another "
                          "template (data.chat_template)")


def _not_a_prefix(k: int, text: str, full: str, why: str) -> str:
    return (f"the chat template renders messages[:{k}] differently from the start of the whole conversation "
            f"({_first_difference(text, full)}) and {why}, so the turn's boundaries cannot be found")


def _first_difference(text: str, full: str) -> str:
    n = _diverge(text, full)
    return f"at character {n}: {excerpt(text[n:n + 30])} vs {excerpt(full[n:n + 30])}"


def _tokenize(tokenizer, text: str, chars: list[int], offsets: bool | None) -> tuple[list[int], list[int]]:
    """``text``'s ids and, for each character boundary, the index of the first token at or after it.

    A token that straddles a start boundary counts as after it; one that straddles an end boundary
    counts as before it (it holds span text either way).
    """
    if offsets is None:
        offsets = bool(getattr(tokenizer, "is_fast", False))
    if offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = [s for s, _ in enc["offset_mapping"]]
        ends = [e for _, e in enc["offset_mapping"]]
        # A start: the first token ending after it (the one holding its first character).
        # An end: the first token starting at or after it (one past the token holding its last character).
        return ids, [bisect.bisect_right(ends, c) if k % 2 == 0 else bisect.bisect_left(starts, c)
                     for k, c in enumerate(chars)]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bounds = []
    for k, c in enumerate(chars):
        prefix = tokenizer(text[:c], add_special_tokens=False)["input_ids"]
        n = next((j for j, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        bounds.append(n + 1 if k % 2 == 1 and n < len(prefix) else n)  # a merged token at an end is in the span
    return ids, bounds
