"""``lora-dist generate``: try a model, a base with an adapter or a merged checkpoint, with one command.

The prompt is rendered as training rendered its data (:func:`lora_dist.chat.render_chat`), with the
generation prompt appended, through the template training used: ``--chat-template``, else the adapter's
``chat_template.jinja`` (written by a run with ``data.chat_template``; its merged export carries it too),
else the tokenizer's own. ``--chat-template none``, or a model without a template, gets the raw text, as
``text`` and string prompt/completion records are trained. Decoding stops at the generation config's EOS
and at the tokens training taught a reply to end with (:func:`lora_dist.chat.end_of_turn_tokens`:
``<|im_end|>``, ``<|eot_id|>``...), or at the text it taught where the template's markers are text in the model's
vocabulary (ChatML on a base without its tokens), which the reply is cut before. Greedy decoding
(``temperature=0``, the default) is deterministic: a base with its adapter gives the same text as the checkpoint
merged from them. Sampling uses the model's generation config for what ``--top-k``/``--top-p`` leave unset, as
``transformers``' ``generate`` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dist.errors import UserError
from lora_dist.inputs import excerpt, read_text

__all__ = ["GenerateError", "Generation", "generate", "load_messages"]

#: The largest --messages file read.
MAX_MESSAGES_BYTES = 1 << 20


class GenerateError(UserError, ValueError):
    """A prompt that cannot be generated from."""


@dataclass
class Generation:
    text: str
    prompt: str
    new_tokens: list[int]


def load_messages(path: str | os.PathLike) -> list[dict]:
    """A conversation from a JSON file: a list of ``{"role", "content"}`` or a ``{"messages": [...]}`` record.

    Raises:
        GenerateError: not JSON, or not a conversation.
    """
    text = read_text(Path(path), GenerateError, "the messages file", max_bytes=MAX_MESSAGES_BYTES)
    try:
        data: Any = json.loads(text)
    except ValueError as e:
        raise GenerateError(f"{path} is not JSON ({e}); write a list of {{\"role\", \"content\"}} objects") from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not (isinstance(data, list) and data and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in data)):
        raise GenerateError(f"{path} must hold a non-empty list of {{\"role\", \"content\"}} objects (or "
                            f"{{\"messages\": [...]}}), got {excerpt(data, 80)}")
    return data


def _template(tokenizer, chat_template: str, adapter: str | os.PathLike | None) -> str | None:
    """The template to render the prompt with (None: the raw text), as the module docstring says."""
    from lora_dist.adapter import adapter_chat_template
    from lora_dist.chat import ChatError, resolve_template

    if chat_template == "none":
        return None
    if not chat_template and adapter is not None:
        trained = adapter_chat_template(adapter)  # the template the adapter was trained with
        if trained is not None:
            return trained
    try:
        return resolve_template(tokenizer, chat_template, option="--chat-template")
    except ChatError as e:
        raise GenerateError(str(e)) from None


def _prompt_ids(tokenizer, prompt: str | None, messages: list[dict] | None,
                template: str | None) -> tuple[list[int], str]:
    from lora_dist.chat import ChatError, bos_prefix, render_chat

    if template is None:
        if messages is not None:
            raise GenerateError("--messages needs a chat template and the tokenizer has none; pass --chat-template "
                                "(chatml, llama3 or a Jinja file), or --prompt with raw text")
        # as training encodes a text record's prompt: BOS where the tokenizer starts texts with it, and nothing
        # else the tokenizer adds itself (an EOS at the end would have the model continue after an end of text)
        ids, head = tokenizer(prompt, add_special_tokens=False)["input_ids"], bos_prefix(tokenizer)
        ids = ids if head and ids[:1] == head else head + ids
        if not ids:
            raise GenerateError("the prompt is empty and the tokenizer starts texts with no BOS token: nothing to "
                                "continue; pass a --prompt with text")
        return ids, prompt
    conversation = messages if messages is not None else [{"role": "user", "content": prompt}]
    try:
        text = render_chat(tokenizer, template, conversation, generation_prompt=True)
    except ChatError as e:
        reason = getattr(e, "reason", str(e))  # what the template raised
        raise GenerateError(f"the chat template fails on this conversation ({reason}); fix the messages or choose "
                            "another template (--chat-template)") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"], text


def _device(name: str | None) -> torch.device:
    """``--device``, checked before the model is loaded (default: the GPU if there is one)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {excerpt(name)} is not a device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise GenerateError(f"--device {name}: no CUDA device is visible to this process (torch "
                                f"{torch.__version__}); pass --device cpu")
        if device.index is not None and device.index >= count:
            raise GenerateError(f"--device {name}: this process sees {count} CUDA device(s), cuda:0 to "
                                f"cuda:{count - 1}; pass one of those")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
            raise GenerateError(f"--device {name}: no {device.type} device is available; pass cpu or cuda")
    return device


def _sampling(temperature: float, top_k: int | None, top_p: float | None) -> dict[str, Any]:
    """``generate``'s decoding options; what is left out comes from the model's generation config, else
    ``transformers``' defaults."""
    if not temperature >= 0:
        raise GenerateError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if temperature == 0:
        if top_k is not None or top_p is not None:
            raise GenerateError("--top-k and --top-p shape sampling, and --temperature 0 decodes greedily; pass "
                                "--temperature above 0 with them, or leave them out")
        return {"do_sample": False}
    options: dict[str, Any] = {"do_sample": True, "temperature": temperature}
    if top_k is not None:
        if top_k < 0:
            raise GenerateError(f"--top-k must be 0 (no cut) or positive, got {top_k}")
        options["top_k"] = top_k
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise GenerateError(f"--top-p must be in (0, 1], got {top_p}")
        options["top_p"] = top_p
    return options


def generate(base: str | os.PathLike, adapter: str | os.PathLike | None = None, *, prompt: str | None = None,
             messages: list[dict] | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, chat_template: str = "",
             device: str | None = None) -> Generation:
    """Generate a reply from ``base`` (with ``adapter`` applied, unmerged, when given).

    Args:
        base: a local HF checkpoint dir (a base model or a merged export).
        adapter: a PEFT-format adapter dir, e.g. a run's ``adapter/``.
        prompt, messages: the user's text, or a whole conversation (exactly one).
        max_new_tokens: the most tokens generated.
        temperature: 0 decodes greedily; above 0 samples, seeded with ``seed``.
        top_k, top_p: sampling's cuts; None leaves them to the model's generation config (else ``transformers``'
            defaults, top_k 50).
        chat_template: ``""`` the adapter's ``chat_template.jinja``, else the tokenizer's own; a shipped name
            (chatml, llama3), a Jinja file, or ``"none"`` for the raw prompt.
        device: where to run (default: the GPU if there is one).

    Raises:
        GenerateError, ModelDirError, AdapterError: bad prompt, option, model dir or adapter.
    """
    from lora_dist.adapter import load_adapter
    from lora_dist.chat import end_of_turn_text, reply_stops
    from lora_dist.data import load_tokenizer
    from lora_dist.model_dir import ModelDir, model_class
    from lora_dist.model import load_base_model

    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if (prompt is None) == (messages is None):
        raise GenerateError("pass exactly one of --prompt TEXT and --messages FILE")
    options = _sampling(temperature, top_k, top_p)
    device = _device(device)
    base_dir = ModelDir(base, "--base")  # validates config.json, weights and their index; never runs code from the dir
    tokenizer = load_tokenizer(base_dir.path)
    template = _template(tokenizer, chat_template, adapter)
    ids, text = _prompt_ids(tokenizer, prompt, messages, template)
    if base_dir.quantized:  # FP8, MXFP4: the dense weights lora_dist trains and merges, read as training reads them
        model = load_base_model(base_dir, torch.device("cpu"))
    else:
        model = model_class(base_dir.hf_config).from_pretrained(base_dir.path, dtype="auto", trust_remote_code=False,
                                                                local_files_only=True)
    if adapter is not None:
        load_adapter(model, adapter)
    model.to(device).eval()
    # Stop where training taught a reply to end: the template's end-of-turn token (or EOS where it writes none),
    # EOS after a raw text; where the template ends a reply with text (ChatML's markers on a vocabulary without
    # them), at that text, which the reply is cut before.
    stops = reply_stops(tokenizer, template, model.generation_config.eos_token_id)
    stop_text = end_of_turn_text(tokenizer, template) if template is not None else ""
    if stop_text:
        options.update(stop_strings=[stop_text], tokenizer=tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    input_ids = torch.tensor([ids], device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             eos_token_id=stops or None, pad_token_id=pad, **options)
    new = out[0, input_ids.shape[1]:].tolist()
    reply = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(reply.split(stop_text)[0].rstrip() if stop_text else reply, text, new)
