"""Training data: sources (.jsonl, .parquet, save_to_disk dirs, .txt, mixtures), tokenized once into a
memory-mapped cache, packed, and split across ranks.

Each record's format is detected on its own (see ``docs/data.md``): ``{"messages": [...]}`` (a
conversation, rendered with the chat template, loss on the assistant turns: :mod:`lora_dist.chat`),
``{"instruction", "input", "output"}`` (alpaca), ``{"text"}`` and ``{"prompt", "completion"}`` (loss on
the completion). A ``.txt`` file is one text record per paragraph. What a source may be and how a
mixture's weights count: :mod:`lora_dist.sources`.

Tokenizing and packing happen once per (data, tokenizer, template, ``seq_len``, packing), in parallel,
into a cache entry that every rank and every restart memory-maps (:mod:`lora_dist.token_cache`);
:class:`PackedDataset` reads its rows from those maps on demand.

Packing (:mod:`lora_dist.packing`): documents are laid out in record order in ``seq_len`` blocks, each
document whole in one block (a document longer than ``seq_len`` is split into consecutive blocks,
counted and logged); a block that cannot take the next document is padded. ``position_ids`` restart at
0 with each document and the model's attention never crosses documents (:func:`block_causal_mask`,
:func:`model_kwargs`). The first token of every document has no label, so no token predicts across a
document boundary: the loss of a block is the token-weighted mean of its documents' losses computed one
by one. ``data.packing=false`` puts one document in each sequence instead.

Held out (``data.eval_fraction``): the last share of each source's records, chosen before the weights are
applied and packed into blocks of their own (:mod:`lora_dist.token_cache`): no held-out document is trained on,
nor split between training and held-out blocks.

Batches are defined globally, independent of the world size: the k-th
micro-batch of the run is samples ``[k*G, (k+1)*G)`` of an endless, seeded
shuffle of the blocks (``G`` = global micro-batch), and rank ``r`` of ``W``
takes its contiguous ``G/W`` share. A single process with ``G`` sequences per
micro-batch therefore sees exactly what ``W`` ranks see together, and a run
resumed on another world size continues from the same sample.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_dist.atomic import writing_file
from lora_dist.chat import IGNORE
from lora_dist.inputs import clip, read_json
from lora_dist.loss import loss_rows, n_targets
from lora_dist.packing import BLOCK_ARRAYS, blocks_fingerprint
from lora_dist.model_dir import (REMOTE_CODE_FIX, ModelDirError, alibi_attention, read_config_json, recurrent_layers,
                                 text_config)
from lora_dist.sources import DataError, Source, describe, input_paths, parse_sources
from lora_dist.token_cache import cached_blocks

__all__ = ["IGNORE", "DataError", "DataStats", "PackedDataset", "batch_inputs", "block_causal_mask", "dump_blocks",
           "load_data", "load_dataset", "load_splits", "load_tokenizer", "marked_text", "model_kwargs", "summarize"]

log = logging.getLogger(__name__)


#: Files that hold a tokenizer's vocabulary, one of which a model dir needs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "*.tiktoken")


def load_tokenizer(model_path: str | Path):
    """The tokenizer saved in a local model dir, never running code from the dir.

    Args:
        model_path: the model dir (``model.path``).

    Returns:
        A ``transformers`` tokenizer.

    Raises:
        ModelDirError: the dir has no tokenizer files, the tokenizer needs code shipped in the
            dir (``auto_map``; ``trust_remote_code`` is never set), or it cannot be loaded.
    """
    from transformers import AutoTokenizer

    path = Path(model_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers' own errors: ValueError, OSError, KeyError...
        reason = clip(" ".join(str(e).split()), 300)
        if _names_custom_code(path):
            raise ModelDirError(
                f"{path}: the tokenizer needs code shipped in the model dir (auto_map); {REMOTE_CODE_FIX}; "
                "convert the tokenizer: load it yourself with trust_remote_code=True after reviewing the code "
                "and save it as a standard tokenizer.json (PreTrainedTokenizerFast.save_pretrained)"
            ) from None
        if not any(True for pattern in TOKENIZER_FILES for _ in path.glob(pattern)):
            raise ModelDirError(
                f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files "
                "from the original checkpoint into it"
            ) from None
        raise ModelDirError(f"cannot load the tokenizer in {path} ({reason}); restore the tokenizer files "
                            "from the original checkpoint") from None


def _names_custom_code(path: Path) -> bool:
    """Whether the dir's tokenizer_config.json or config.json names custom tokenizer code (``auto_map``)."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            config = read_json(path / name, ValueError, name)
        except ValueError:
            continue
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if name == "tokenizer_config.json" and auto_map:
            return True
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
            return True
    return False


@dataclass
class DataStats:
    """What packing made of the records (``lora-dist data`` prints it; training logs it)."""

    records: dict[str, int] = field(default_factory=dict)
    """Records per format."""
    documents: int = 0
    split: int = 0
    """Documents longer than ``seq_len``, split into consecutive blocks (``data.long_documents``)."""
    blocks: int = 0
    tokens: int = 0
    """Document tokens (padding excluded)."""
    loss_tokens: int = 0
    """Tokens with a label (each is predicted from the token before it)."""
    seq_len: int = 0
    packing: bool = True
    truncated: int = 0
    """Documents longer than ``seq_len``, cut to their first ``seq_len`` tokens."""
    dropped: int = 0
    """Documents longer than ``seq_len`` left out (``drop``, or a prompt that fills the block: nothing to learn)."""


@dataclass
class PackedDataset:
    """``seq_len`` blocks of documents: ids, labels, each document's positions and each row's unpadded length."""

    input_ids: torch.Tensor  # (n_blocks, seq_len) int32 (memory-mapped from the token cache) or int64
    labels: torch.Tensor  # (n_blocks, seq_len) as input_ids, -100 where there is no loss
    position_ids: torch.Tensor | None = None  # (n_blocks, seq_len) int32, 0 at each document's start; None: 0..S-1
    lengths: torch.Tensor | None = None  # (n_blocks,) int32 tokens before each row's padding; None: no padding
    stats: DataStats | None = None
    held_out: "PackedDataset | None" = None
    """The held-out blocks of the same sources (:func:`load_dataset`'s ``eval_fraction``), or None."""
    eval_fraction: float = 0.0
    """The share of each source's records held out of these blocks."""
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)
    _load: dict | None = field(default=None, init=False, repr=False, compare=False)
    _orders: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def fingerprint(self) -> str:
        """A SHA-256 of the blocks (:func:`~lora_dist.packing.blocks_fingerprint`), computed once: what a resumed run
        must read again to continue where its checkpoint stopped (``state.json``'s ``data``)."""
        if self._fingerprint is None:
            self._fingerprint = blocks_fingerprint({name: None if getattr(self, name) is None else
                                                    getattr(self, name).numpy() for name in BLOCK_ARRAYS})
        return self._fingerprint

    def split(self, eval_fraction: float) -> tuple["PackedDataset", "PackedDataset | None"]:
        """The training blocks and the held-out ones (None where none are) with the last ``eval_fraction`` of each
        source's records held out (:func:`load_dataset`): these blocks and :attr:`held_out` where they were loaded
        with that fraction, else the sources loaded again with it (another cache entry).

        Raises:
            ValueError: blocks not loaded by :func:`load_dataset`, asked for another fraction.
        """
        if eval_fraction == self.eval_fraction:
            return self, self.held_out
        if self._load is None:
            raise ValueError(f"these blocks hold out eval_fraction={self.eval_fraction:g} and were not loaded by "
                             f"load_dataset; load the data with eval_fraction={eval_fraction:g}")
        return load_dataset(**{**self._load, "eval_fraction": eval_fraction}).split(eval_fraction)

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        """The blocks' order in ``epoch`` of the stream ``seed`` shuffles; the last two epochs' kept, so a step's
        micro-batches do not draw the permutation again (65 ms each at 4M blocks)."""
        cache = self._orders
        if (epoch, seed) not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[(epoch, seed)] = torch.randperm(len(self), generator=g)
            for stale in list(cache)[:-2]:
                del cache[stale]
        return cache[(epoch, seed)]

    def indices(self, start: int, size: int, seed: int) -> torch.Tensor:
        """Block indices of samples ``[start, start+size)`` of the endless shuffled stream."""
        n = len(self)
        idx = []
        for pos in range(start, start + size):
            epoch, i = divmod(pos, n)
            idx.append(int(self.order(epoch, seed)[i]))
        return torch.tensor(idx, dtype=torch.long)

    def batch(self, start: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of samples ``[start, start+size)`` of the endless shuffled stream."""
        index = self.indices(start, size, seed)
        return self.input_ids[index].long(), self.labels[index].long()

    def micro_batch(self, start: int, size: int, seed: int, device: torch.device | str | None = None) -> dict:
        """The model inputs of samples ``[start, start+size)`` of the shuffled stream (see :meth:`inputs`)."""
        return self.inputs(self.indices(start, size, seed), device)

    def inputs(self, index, device: torch.device | str | None = None) -> dict[str, torch.Tensor | None]:
        """The model inputs of some blocks, on ``device`` (:func:`batch_inputs`).

        Args:
            index: block indices (a list or a 1-D tensor).
            device: where the tensors go (the mask is built there).

        Returns:
            :func:`batch_inputs` of the blocks' ids, labels and positions, ``L`` the longest row's unpadded length
            (columns that are padding in every row are dropped).
        """
        index = torch.as_tensor(index, dtype=torch.long)
        width = self.input_ids.shape[1] if self.lengths is None else int(self.lengths[index].max())
        ids, labels = self.input_ids[index, :width].long(), self.labels[index, :width].long()
        if self.position_ids is None:
            positions = torch.arange(width).expand(len(index), width)
        else:
            positions = self.position_ids[index, :width].long()
        return batch_inputs(ids, labels, positions, device)


def batch_inputs(ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                 device: torch.device | str | None = None) -> dict[str, Any]:
    """A micro-batch, from its ``(B, L)`` int64 host tensors, as a training step takes it, on ``device``.

    Returns:
        ``{"input_ids", "labels", "position_ids", "attention_mask"}``: the tensors, and the ``(B, 1, L, L)``
        boolean block-diagonal causal mask (True: may attend), or None where every row holds one document and
        no padding. Pass it through :func:`model_kwargs`. Also what the model and the loss need to know on the
        host, found here before the tensors go to ``device``, so that no step waits for a GPU to learn it:
        ``"n_targets"``, the tokens that carry a loss (:func:`~lora_dist.loss.n_targets`, an int), and
        ``"loss_rows"``, where they are (:func:`~lora_dist.loss.loss_rows`, on ``device``).
    """
    several = _several_documents(positions)  # decided here, on the host: no wait for the device
    targets, rows = n_targets(labels), loss_rows(labels)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":  # from pinned memory: the copies are queued, no wait for what the GPU is running
        ids, labels, positions, rows = (t.pin_memory().to(device, non_blocking=True)
                                        for t in (ids, labels, positions, rows))
    else:
        ids, labels, positions, rows = (t.to(device) for t in (ids, labels, positions, rows))
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "attention_mask": _block_mask(positions) if several else None,
            "n_targets": targets, "loss_rows": rows}


def _several_documents(position_ids: torch.Tensor) -> bool:
    """Whether some row holds two documents (or a document and padding): ``position_ids`` restart at 0 in it."""
    return bool((position_ids[:, 1:] == 0).any())


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The ``(B, 1, L, L)`` boolean mask (True: may attend) that keeps attention causal and inside each
    document, the documents of a row starting where ``position_ids`` is 0; None if no row holds two."""
    return _block_mask(position_ids) if _several_documents(position_ids) else None


def _block_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """:func:`block_causal_mask`, built where ``position_ids`` are, without asking whether it is needed."""
    doc = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


def model_kwargs(batch: dict, config=None) -> dict[str, Any]:
    """What to pass to ``model(**kwargs)`` for a batch of :meth:`PackedDataset.inputs` (not its labels).

    Args:
        batch: the batch.
        config: the model's config (``model.config``); None: a model with sdpa attention on every layer.

    Returns:
        ``input_ids``, ``position_ids``, ``use_cache=False`` (a cache turns off transformers' own
        packed-sequence handling) and, where the batch has a mask:

        * sdpa: the boolean 4-D mask as ``attention_mask`` (transformers uses a 4-D mask as given);
          eager and any other attention: the same mask, additive (fp32);
        * a model with sliding-window or chunked layers: no mask; transformers builds each layer's
          mask from ``position_ids`` (it finds the documents where they restart), windows included;
        * ``flash_attention_*``/``flex_attention``: no mask, the batch flattened to one row whose
          ``position_ids`` give transformers' varlen path the document starts. The logits are then
          ``(1, B*L, V)``, and ``token_loss_sum(logits, batch["labels"])`` is the same loss, since every
          row's first label is -100.
        * ALiBi (Bloom; :func:`~lora_dist.model_dir.alibi_attention`), whose rows hold one document each: the
          2-D mask of the document's tokens (the padding after it masked), no ``position_ids``.
    """
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                              "use_cache": False}
    if config is not None and alibi_attention(text_config(config)):  # one document a row (load_data): its tokens
        first = (batch["position_ids"] == 0).cumsum(-1) == 1  # are the row's first run, the padding after it
        return {"input_ids": kwargs["input_ids"], "attention_mask": first.long(), "use_cache": False}
    mask = batch.get("attention_mask")
    if mask is None:
        return kwargs
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if "flash" in impl or "flex" in impl:
        return {"input_ids": kwargs["input_ids"].reshape(1, -1), "position_ids": kwargs["position_ids"].reshape(1, -1),
                "use_cache": False}
    if _windowed(config):
        return kwargs
    if impl == "sdpa":
        kwargs["attention_mask"] = mask
    else:
        kwargs["attention_mask"] = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo().min)
    return kwargs


def _unpackable(config: dict) -> str | None:
    """Why documents of this model (``config.json``) cannot share a block, None where they can."""
    recurrent = recurrent_layers(config)
    if recurrent:
        return (f"the model has layers that carry a state along the sequence ({recurrent}), which would flow from "
                "one packed document into the next")
    if alibi_attention(config):
        return "the model's ALiBi attention takes no mask that keeps packed documents apart"
    return None


def _windowed(config) -> bool:
    """Whether some layer of the model attends through a sliding window or in chunks (Mistral, Gemma-2/3...).
    A vision-language config holds its language model's in ``text_config``."""
    config = text_config(config)
    types = getattr(config, "layer_types", None)
    if types:
        return any(t != "full_attention" for t in types)
    return bool(getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None))


def load_dataset(path: str | Path | list, tokenizer, seq_len: int, max_positions: int | None = None, *,
                 packing: bool = True, chat_template: str = "", loss_on: str = "all_assistant",
                 verbose: bool = True, cache_dir: str | Path | None = None, num_proc: int = 0,
                 eval_fraction: float = 0.0, long_documents: str = "auto") -> PackedDataset:
    """Read, tokenize and pack a source (or a mixture), through the token cache.

    Args:
        path: ``data.path``: a .jsonl/.json, .parquet or .txt file, a ``save_to_disk`` dir, or a list of
            paths and ``{"path", "weight"}`` mappings (:func:`lora_dist.sources.parse_sources`).
        seq_len: ``train.seq_len``.
        tokenizer: the model dir's tokenizer.
        max_positions: the model's positions, if known.
        packing, chat_template, loss_on: ``data.packing``, ``data.chat_template``, ``data.loss_on``.
        verbose: log the counts (documents split, truncated or dropped; padding) and the cache entry.
        cache_dir, num_proc: ``data.cache_dir`` (None: ``$LORA_DIST_CACHE`` or ``~/.cache/lora_dist/tokens``),
            ``data.num_proc`` (0: the CPUs, at most 8).
        eval_fraction: ``data.eval_fraction``: the last share of each source's records (at least one record, if
            the largest source has two) is held out before the weights are applied, packed into the returned
            blocks' :attr:`~PackedDataset.held_out`, once each; the blocks returned are the others'.
        long_documents: ``data.long_documents``: what becomes of a document longer than ``seq_len``
            (:mod:`lora_dist.packing`).

    Raises:
        DataError: missing/empty/malformed source or record (one line: the file, the line or row, the fields
            expected), ``seq_len`` beyond the model's positions, a conversation without a usable chat
            template, or no token with a loss.
    """
    if max_positions is not None and seq_len > max_positions:
        raise DataError(
            f"train.seq_len={seq_len} exceeds the model's {max_positions} positions; set train.seq_len<={max_positions}"
        )
    sources = _sources(path, "data.path")
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    cached = cached_blocks(sources, tokenizer, chat_template, loss_on, seq_len, packing, pad_id, cache_dir, num_proc,
                           verbose, eval_fraction, long_documents)
    stats = DataStats(**cached["meta"]["stats"])
    where = describe(sources)
    if stats.loss_tokens == 0:
        raise DataError(f"{where}: no token carries a loss (every label is masked); check the record formats "
                        "(the loss falls on completions, outputs and assistant turns)")
    held_out = None
    if cached["held_out"] is not None:
        held_out = _blocks(cached["held_out"], DataStats(**cached["meta"]["eval"]["stats"]))
    if verbose:
        if stats.split + stats.truncated + stats.dropped:
            log.warning("%s: documents longer than train.seq_len=%d: %d split into consecutive blocks, %d cut to their "
                        "first %d tokens, %d left out, of %d (data.long_documents=%s)", where, seq_len, stats.split,
                        stats.truncated, seq_len, stats.dropped, stats.documents + stats.dropped, long_documents)
        log.info("%s: %d blocks of %d; %s", where, stats.blocks, seq_len, "; ".join(_counts(stats)))
        if held_out is not None:
            log.info("%s: held out (data.eval_fraction=%g): %d records in %d blocks", where, eval_fraction,
                     sum(held_out.stats.records.values()), len(held_out))
    data = _blocks(cached["arrays"], stats, held_out, eval_fraction)
    data._load = {"path": path, "tokenizer": tokenizer, "seq_len": seq_len, "max_positions": max_positions,
                  "packing": packing, "chat_template": chat_template, "loss_on": loss_on, "verbose": verbose,
                  "cache_dir": cache_dir, "num_proc": num_proc, "long_documents": long_documents}
    return data


def _blocks(arrays: dict, stats: DataStats, held_out: PackedDataset | None = None,
            eval_fraction: float = 0.0) -> PackedDataset:
    """A :class:`PackedDataset` over a cache entry's memory-mapped arrays."""
    tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
    return PackedDataset(tensors["input_ids"], tensors["labels"], tensors["position_ids"], tensors["lengths"], stats,
                         held_out, eval_fraction)


def _sources(value, key: str) -> list[Source]:
    try:
        sources = parse_sources(value, key)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not sources:
        raise DataError(f"{key} is not set; pass {key}=/path/to/train.jsonl")
    return sources


def load_data(cfg, tokenizer, max_positions: int | None = None, verbose: bool = True,
              key: str = "path") -> PackedDataset:
    """:func:`load_dataset` as a run's :class:`~lora_dist.config.Config` asks (``data.*``, ``train.seq_len``;
    ``data.eval_fraction`` held out); ``key="eval_path"`` loads the validation source instead."""
    d = cfg.data
    value = getattr(d, key)
    if not value:
        raise DataError(f"data.{key} is not set; pass data.{key}=/path/to/train.jsonl")
    if d.eval_path:
        _check_held_out(d)
    packing = d.packing
    unpackable = _unpackable(read_config_json(cfg.model.path)) if packing and cfg.model.path else None
    if unpackable:  # one document a row
        if verbose:
            log.warning("data.packing is off: %s; each block holds one document", unpackable)
        packing = False
    return load_dataset(value, tokenizer, cfg.train.seq_len, max_positions, packing=packing,
                        chat_template=d.chat_template, loss_on=d.loss_on, verbose=verbose,
                        cache_dir=d.cache_dir or None, num_proc=d.num_proc,
                        eval_fraction=d.eval_fraction if key == "path" else 0.0, long_documents=d.long_documents)


def load_splits(cfg, tokenizer, max_positions: int | None = None,
                verbose: bool = True) -> tuple[PackedDataset, PackedDataset | None]:
    """A run's training blocks and its held-out blocks (``None`` when there are none), as ``data.*`` asks:
    ``data.eval_path``'s blocks, or those of the last ``data.eval_fraction`` of each ``data.path`` source's
    records (:func:`load_dataset`).

    Collective when a process group is initialized (one rank builds the cache): call on every rank.
    """
    train = load_data(cfg, tokenizer, max_positions, verbose)
    if cfg.data.eval_path:
        return train, load_data(cfg, tokenizer, max_positions, verbose, key="eval_path")
    return train, train.held_out


def _check_held_out(d) -> None:
    """Refuse a ``data.eval_path`` source that is a ``data.path`` source too: its records would be trained on and
    the eval loss measured on them, without a word."""
    trained = {os.path.realpath(s.path) for s in parse_sources(d.path, "data.path")}
    both = [s.path for s in parse_sources(d.eval_path, "data.eval_path") if os.path.realpath(s.path) in trained]
    if both:
        raise DataError(f"data.eval_path source {both[0]} is a data.path source too: its records would be trained on "
                        "and evaluated; drop it from data.path, or hold out a share of it with data.eval_fraction "
                        "instead of data.eval_path")


def _counts(s: DataStats) -> list[str]:
    return [f"records: {sum(s.records.values())} ({', '.join(f'{v} {k}' for k, v in sorted(s.records.items()))})",
            f"tokens: {s.tokens} ({s.tokens / max(s.blocks * s.seq_len, 1):.1%} of the block positions, the rest "
            "padding)",
            f"tokens with a loss: {s.loss_tokens} ({s.loss_tokens / max(s.tokens, 1):.1%})",
            f"documents longer than train.seq_len: {s.split} split, {s.truncated} truncated, {s.dropped} left out, "
            f"of {s.documents + s.dropped}"]


def _combined(data: PackedDataset) -> DataStats:
    """The stats of the training blocks and the held-out ones together."""
    s, h = data.stats, data.held_out.stats if data.held_out is not None else None
    if h is None:
        return s
    records = {k: s.records.get(k, 0) + h.records.get(k, 0) for k in {*s.records, *h.records}}
    total = {k: getattr(s, k) + getattr(h, k) for k in ("documents", "split", "blocks", "tokens", "loss_tokens",
                                                        "truncated", "dropped")}
    return DataStats(records, seq_len=s.seq_len, packing=s.packing, **total)


def _open(cfg) -> tuple[PackedDataset, PackedDataset | None, Any]:
    """The run's blocks (``data.eval_fraction``'s held out in their ``held_out``), ``data.eval_path``'s blocks (or
    None) and the tokenizer, checked as training checks them."""
    tokenizer = load_tokenizer(cfg.model.path)
    config = read_config_json(cfg.model.path)
    max_pos = config.get("max_position_embeddings") or config.get("n_positions")
    max_pos = max_pos if isinstance(max_pos, int) else None
    data = load_data(cfg, tokenizer, max_pos, verbose=False)
    held_out = load_data(cfg, tokenizer, max_pos, verbose=False, key="eval_path") if cfg.data.eval_path else None
    return data, held_out, tokenizer


#: How every line of a dump starts, and what else it holds (json.dumps of the row dump_blocks writes): an earlier
#: dump is recognised by its first line.
_DUMP_PREFIX = b'{"input_ids": ['
_DUMP_KEYS = (b'], "labels": [', b'], "position_ids": [')
_DUMP_LINE_LIMIT = 1 << 28  # a first line longer than this is not a dump (256 MiB: 10M-token blocks)



def _dump_target(out: Path) -> tuple[Path, bool]:
    """Where ``--dump OUT`` writes and whether that is a file to replace atomically (links followed), or a
    stream to append to: ``/dev/stdout`` (whatever it is redirected to, ``>> log`` included), another device
    or a pipe.

    Raises:
        DataError: a dir, a link that leads nowhere, or a file whose first line is not a block (lora_dist
            replaces only what it wrote).
    """
    fix = "choose another --dump path or remove it"
    if out.absolute().parts[1:2] in (("dev",), ("proc",)):
        return out, False
    try:
        target = out.resolve()
        st = os.stat(target) if os.path.lexists(target) else None
    except (OSError, RuntimeError) as e:  # a link loop, a dir that cannot be read
        raise DataError(f"--dump {out} cannot be followed ({getattr(e, 'strerror', None) or e}); {fix}") from None
    if st is None:
        if not target.parent.is_dir():
            raise DataError(f"--dump {out}: {target.parent} is not a directory; {fix}")
        return target, True
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"--dump {out} is a directory; {fix}")
    if not stat.S_ISREG(st.st_mode):
        return target, False
    with target.open("rb") as f:
        first = f.readline(_DUMP_LINE_LIMIT)
    if first.strip() and not (first.startswith(_DUMP_PREFIX) and all(k in first for k in _DUMP_KEYS)):
        raise DataError(f"--dump {out} exists and is not a block dump lora-dist data wrote; {fix}")
    return target, True


def dump_blocks(cfg, out: str | Path, limit: int | None = None) -> int:
    """Write the blocks a run trains on, in packed order (before shuffling), one JSON line each.

    Each line is ``{"input_ids", "labels", "position_ids"}``, the labels aligned with the inputs
    (``-100`` where there is no loss; the loss shifts them). These are ``data.path``'s blocks: the
    training ones, then those of the records ``data.eval_fraction`` holds out (``data.eval_path``'s blocks are
    not written).
    ``out`` may not be a data source nor lie in the model dir, and an existing ``out`` is replaced only if it
    is an earlier dump (or empty); the file appears complete or not at all. Returns the number of blocks
    written (at most ``limit``).

    Raises:
        DataError, ModelDirError: as :func:`load_dataset` and :func:`load_tokenizer`.
    """
    out = Path(out)
    for source in (*input_paths(cfg.data), cfg.model.path):
        if source and (out.resolve() == Path(source).resolve() or Path(source).resolve() in out.resolve().parents):
            raise DataError(f"--dump {out} would overwrite an input ({source}); write the blocks elsewhere")
    target, replace = _dump_target(out)
    data, _, _ = _open(cfg)
    rows = [(part, k) for part in (data, data.held_out) if part is not None for k in range(len(part))]
    rows = rows if limit is None else rows[:max(0, limit)]
    with writing_file(target, encoding="utf-8") if replace else target.open("a", encoding="utf-8") as f:
        for part, k in rows:
            f.write(json.dumps({"input_ids": part.input_ids[k].tolist(), "labels": part.labels[k].tolist(),
                                "position_ids": part.position_ids[k].tolist()}) + "\n")
    return len(rows)


def summarize(cfg, max_chars: int = 4000) -> str:
    """What a run would train on: records per format, blocks, tokens, the share with a loss, documents
    split, and the first block's text with the tokens that carry no loss between ``[[`` and ``]]``.

    Raises:
        DataError, ModelDirError: as :func:`load_dataset` and :func:`load_tokenizer`.
    """
    data, held_out, tokenizer = _open(cfg)
    s = _combined(data)
    if held_out is None:
        blocks = f"{len(data)} train, {0 if data.held_out is None else len(data.held_out)} eval"
    else:
        blocks = f"all train; eval: {len(held_out)} blocks of {describe(_sources(cfg.data.eval_path, 'data.eval_path'))}"
    lines = [f"data: {describe(_sources(cfg.data.path, 'data.path'))}", *_counts(s)[:1],
             f"blocks: {s.blocks} of train.seq_len={s.seq_len} ({blocks}), "
             f"packing {'on' if s.packing else 'off'}{_packing_off_because(cfg, s)}", *_counts(s)[1:],
             "first block (no loss on [[...]]; each document on its own line):"]
    lines.append(clip(marked_text(tokenizer, data.input_ids[0], data.labels[0], data.position_ids[0],
                                  int(data.lengths[0])), max_chars))
    return "\n".join(lines)


def _packing_off_because(cfg, s: DataStats) -> str:
    """Why packing is off, for :func:`summarize`: asked (``data.packing=false``) or the model's
    (:func:`_unpackable`)."""
    if s.packing:
        return ""
    if not cfg.data.packing:
        return " (data.packing=false)"
    return f" ({_unpackable(read_config_json(cfg.model.path))}: one document a block)"


def marked_text(tokenizer, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, length: int) -> str:
    """A block's text, the runs of tokens without a loss between ``[[`` and ``]]``, a line per document."""
    parts: list[str] = []
    run: list[int] = []
    masked = None
    for k in range(length):
        is_masked = int(labels[k]) == IGNORE
        if k and int(positions[k]) == 0 or is_masked != masked:
            _flush_run(tokenizer, run, masked, parts)
            run = []
            if k and int(positions[k]) == 0:
                parts.append("\n")
        masked = is_masked
        run.append(int(ids[k]))
    _flush_run(tokenizer, run, masked, parts)
    if length < len(ids):
        parts.append(f"\n[[padding: {len(ids) - length} tokens]]")
    return "".join(parts)


def _flush_run(tokenizer, run: list[int], masked: bool | None, parts: list[str]) -> None:
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        parts.append(f"[[{text}]]" if masked else text)
