"""``lora-dist generate``: try a model, a base with an adapter or a merged checkpoint, with one command.

The prompt goes through the chat template when there is one (the tokenizer's own,
or ``--chat-template``), as the training data did, with the generation prompt
appended; a model without a template gets the raw text. Greedy decoding
(``temperature=0``, the default) is deterministic: a base with its adapter gives
the same text as the checkpoint merged from them.
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


def _prompt_ids(tokenizer, prompt: str | None, messages: list[dict] | None, chat_template: str) -> tuple[list[int], str]:
    from lora_dist.chat import resolve_template

    if (prompt is None) == (messages is None):
        raise GenerateError("pass exactly one of --prompt TEXT and --messages FILE")
    template = None if chat_template == "none" else resolve_template(tokenizer, chat_template)
    if template is None:
        if messages is not None:
            raise GenerateError("--messages needs a chat template and the tokenizer has none; pass --chat-template "
                                "(chatml, llama3 or a Jinja file), or --prompt with raw text")
        return tokenizer(prompt)["input_ids"], prompt
    conversation = messages if messages is not None else [{"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError, UndefinedError...
        raise GenerateError(f"the chat template fails on this conversation ({excerpt(str(e), 200)}); fix the "
                            "messages or choose another template (--chat-template)") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"], text


def generate(base: str | os.PathLike, adapter: str | os.PathLike | None = None, *, prompt: str | None = None,
             messages: list[dict] | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
             seed: int = 0, chat_template: str = "", device: str | None = None) -> Generation:
    """Generate a reply from ``base`` (with ``adapter`` applied, unmerged, when given).

    Args:
        base: a local HF checkpoint dir (a base model or a merged export).
        adapter: a PEFT-format adapter dir, e.g. a run's ``adapter/``.
        prompt, messages: the user's text, or a whole conversation (exactly one).
        max_new_tokens: the most tokens generated.
        temperature: 0 decodes greedily; above 0 samples, seeded with ``seed``.
        chat_template: ``""`` the tokenizer's own, a shipped name (chatml, llama3), a Jinja file, or
            ``"none"`` for the raw prompt.
        device: where to run (default: the GPU if there is one).

    Raises:
        GenerateError, ModelDirError, AdapterError: bad prompt, model dir or adapter.
    """
    from lora_dist.adapter import load_adapter
    from lora_dist.data import load_tokenizer
    from lora_dist.model_dir import ModelDir, model_class
    from lora_dist.model import load_base_model

    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise GenerateError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    base_dir = ModelDir(base)  # validates config.json, weights and their index; never runs code from the dir
    tokenizer = load_tokenizer(base_dir.path)
    ids, text = _prompt_ids(tokenizer, prompt, messages, chat_template)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if base_dir.quantized:  # FP8, MXFP4: the dense weights lora_dist trains and merges, read as training reads them
        model = load_base_model(base_dir, torch.device("cpu"))
    else:
        model = model_class(base_dir.hf_config).from_pretrained(base_dir.path, dtype="auto", trust_remote_code=False,
                                                                local_files_only=True)
    if adapter is not None:
        load_adapter(model, adapter)
    model.to(device).eval()
    input_ids = torch.tensor([ids], device=device)
    eos = tokenizer.eos_token_id
    options: dict[str, Any] = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                             top_k=None, top_p=None, **options)
    new = out[0, input_ids.shape[1]:].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), text, new)
