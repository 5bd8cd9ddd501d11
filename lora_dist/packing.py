"""Packing documents into ``seq_len`` blocks, streamed: a document in, full blocks out to a sink.

Documents are laid out in order, each whole in one block; a block that cannot take the next document is
padded; ``position_ids`` restart at 0 with each document (the padding too: no row attends to nothing);
each document's (and each piece's) first token has label -100. With ``packing=False`` a block holds one
document or piece. Only the block being filled and a bounded buffer of finished blocks are in memory.

A document longer than ``seq_len`` (``data.long_documents``) is split into consecutive blocks, each learned
(``split``: text, where every token is learned, reads on from where the last block stopped), cut to its first
``seq_len`` tokens (``truncate``: a document with a prompt - a conversation, a completion - whose later pieces
would be learned without the prompt or the answer's start they follow), or left out (``drop``); ``auto`` splits
text and truncates a document with a prompt (a token without a label, but a text's leading BOS), as TRL truncates.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping

import numpy as np

from lora_dist.chat import IGNORE

__all__ = ["BLOCK_ARRAYS", "LONG_DOCUMENTS", "Packer", "blocks_fingerprint"]

#: ``data.long_documents``: what becomes of a document longer than ``seq_len``.
LONG_DOCUMENTS = ("auto", "split", "truncate", "drop")

#: The arrays of a packed dataset: name -> (dtype, per block: a row of ``seq_len`` or one value).
BLOCK_ARRAYS = {"input_ids": "row", "labels": "row", "position_ids": "row", "lengths": "value"}
DTYPE = np.int32


def blocks_fingerprint(arrays: Mapping[str, np.ndarray | None]) -> str:
    """A SHA-256 of packed blocks (:data:`BLOCK_ARRAYS`, a missing one None), their values as little-endian int32
    whatever their dtype and byte order, read in chunks of rows (about 1.5 GB/s). What a checkpoint records of its
    data, and what ranks holding their own copy of the token cache compare."""
    ids = arrays["input_ids"]
    h = hashlib.sha256(f"{tuple(ids.shape)}".encode())
    rows = max(1, (64 << 20) // (4 * max(1, ids.shape[1])))
    for name in BLOCK_ARRAYS:
        array = arrays.get(name)
        h.update(name.encode() + (b"-" if array is None else b"+"))
        for start in range(0, 0 if array is None else len(array), rows):
            h.update(memoryview(np.ascontiguousarray(array[start:start + rows]).astype("<i4")).cast("B"))
    return h.hexdigest()


class Packer:
    """Next-fit packing of a stream of documents into ``seq_len`` blocks.

    Args:
        seq_len: tokens per block.
        packing: several documents per block (else one document or piece each).
        pad_id: the padding token.
        sink: called with ``{name: array}`` of up to ``buffer_blocks`` finished blocks, in order.
        buffer_blocks: finished blocks held before they go to the sink.
        long_documents: one of :data:`LONG_DOCUMENTS` (the module docstring).
        bos_id: the BOS a text document starts with, unlabeled (:func:`lora_dist.chat.bos_prefix`), or None where
            a text starts with its first word: every other token without a label is a prompt's.

    Attributes (after :meth:`finish`): ``blocks``, ``documents`` (non-empty, packed), ``split``, ``truncated``
    and ``dropped`` (documents longer than ``seq_len``), ``tokens`` (excluding padding), ``loss_tokens``
    (labels other than -100).
    """

    def __init__(self, seq_len: int, packing: bool, pad_id: int, sink: Callable[[dict[str, np.ndarray]], None],
                 buffer_blocks: int = 1024, long_documents: str = "auto", bos_id: int | None = None):
        if long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"long_documents={long_documents!r} is not one of {', '.join(LONG_DOCUMENTS)}")
        self.seq_len, self.packing, self.pad_id, self.sink = seq_len, packing, pad_id, sink
        self.long_documents, self.bos_id = long_documents, bos_id
        self.buf = {name: np.empty((buffer_blocks, seq_len) if shape == "row" else buffer_blocks, DTYPE)
                    for name, shape in BLOCK_ARRAYS.items()}
        self.n_buf = 0
        self.used = 0
        self.blocks = self.documents = self.split = self.truncated = self.dropped = self.tokens = self.loss_tokens = 0
        self._start_row()

    def _start_row(self) -> None:
        k = self.n_buf
        self.buf["input_ids"][k] = self.pad_id
        self.buf["labels"][k] = IGNORE
        self.used = 0

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        """One document: its token ids and labels (-100 where there is no loss)."""
        n, S = len(ids), self.seq_len
        if n == 0:
            return
        if n > S:
            how = self.long_documents
            if how == "auto":
                how = "truncate" if self._has_prompt(ids, labels) else "split"
            if how == "truncate":
                ids, labels, n = ids[:S], labels[:S], S
                if not (labels[1:] != IGNORE).any():  # the prompt fills the block: nothing left to learn
                    how = "drop"
            if how == "drop":
                self.dropped += 1
                return
            if how == "split":
                self.split += 1
                self._flush()
            else:
                self.truncated += 1
        self.documents += 1
        for k in range(0, n, S):
            piece = min(S, n - k)
            if self.used + piece > S or (self.used and not self.packing):
                self._flush()
            row, a = self.n_buf, self.used
            self.buf["input_ids"][row, a:a + piece] = ids[k:k + piece]
            self.buf["labels"][row, a + 1:a + piece] = labels[k + 1:k + piece]  # a piece's first token: no label
            self.buf["position_ids"][row, a:a + piece] = np.arange(piece, dtype=DTYPE)
            self.used += piece

    def _has_prompt(self, ids: np.ndarray, labels: np.ndarray) -> bool:
        """Whether a document holds tokens it does not learn (a prompt, a conversation's other turns): a label of
        -100 anywhere but on a text's leading BOS. A one-token prompt is one too (Qwen's and GPT-2's texts start
        with no BOS, so their first token is labeled)."""
        first = 1 if self.bos_id is not None and ids[0] == self.bos_id else 0
        return bool((labels[first:] == IGNORE).any())

    def _flush(self) -> None:
        """Close the row being filled (pad it, its padding positions counting from 0), if it holds anything."""
        if not self.used:
            return
        row, used = self.n_buf, self.used
        self.buf["position_ids"][row, used:] = np.arange(self.seq_len - used, dtype=DTYPE)
        self.buf["lengths"][row] = used
        self.tokens += used
        self.loss_tokens += int((self.buf["labels"][row, :used] != IGNORE).sum())
        self.blocks += 1
        self.n_buf += 1
        if self.n_buf == len(self.buf["lengths"]):
            self._drain()
        self._start_row()

    def _drain(self) -> None:
        if self.n_buf:
            self.sink({name: a[:self.n_buf] for name, a in self.buf.items()})
            self.n_buf = 0

    def finish(self) -> None:
        """Pad and hand over the last block (never dropped), then every buffered one."""
        self._flush()
        self._drain()
