"""Training data: local .jsonl / .txt, tokenized, packed, and split across ranks.

Documents are tokenized with the checkpoint's tokenizer, joined with EOS and
packed into ``seq_len`` blocks. Labels are the inputs (the loss shifts them),
or ``-100`` on prompt tokens for ``prompt``/``completion`` records, so only the
completion is learned.

Batches are defined globally, independent of the world size: the k-th
micro-batch of the run is samples ``[k*G, (k+1)*G)`` of an endless, seeded
shuffle of the blocks (``G`` = global micro-batch), and rank ``r`` of ``W``
takes its contiguous ``G/W`` share. A single process with ``G`` sequences per
micro-batch therefore sees exactly what ``W`` ranks see together, and a run
resumed on another world size continues from the same sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_dist.inputs import clip, read_json, utf8_error
from lora_dist.model_dir import REMOTE_CODE_FIX, ModelDirError

__all__ = ["DataError", "PackedDataset", "load_dataset", "load_tokenizer"]

IGNORE = -100


class DataError(ValueError):
    """Data that cannot be trained on."""


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


def _not_utf8(path: Path) -> DataError:
    """The one-line error for a data file that is not UTF-8, naming its first bad byte's line and column."""
    where = "somewhere"
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = utf8_error(raw, e, first_line=lineno)
                break
    return DataError(f"{path}: not UTF-8 text ({where}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _read_records(path: Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs; plain text has an empty prompt."""
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r} not found; point data.path at a .jsonl or .txt file")
    try:
        return _parse_records(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _parse_records(path: Path) -> list[tuple[str, str]]:
    records: list[tuple[str, str]] = []
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8-sig")
        records = [("", para) for para in text.split("\n\n") if para.strip()]
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: JSON nested too deeply to be a record") from None
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    records.append(("", row["text"]))
                elif isinstance(row, dict) and isinstance(row.get("completion"), str):
                    records.append((str(row.get("prompt", "")), row["completion"]))
                else:
                    raise DataError(f'{path}:{lineno}: expected a "text" field or "prompt"/"completion" fields')
    else:
        raise DataError(f"data.path {str(path)!r}: unsupported file type {path.suffix!r}; use .jsonl or .txt")
    if not records:
        raise DataError(f"data.path {str(path)!r} holds no records")
    return records


@dataclass
class PackedDataset:
    """Packed ``(input_ids, labels)`` blocks of ``seq_len`` tokens."""

    input_ids: torch.Tensor  # (n_blocks, seq_len) int64
    labels: torch.Tensor  # (n_blocks, seq_len) int64

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def split(self, eval_fraction: float) -> tuple["PackedDataset", "PackedDataset | None"]:
        n_eval = int(len(self) * eval_fraction)
        if eval_fraction > 0 and n_eval == 0 and len(self) > 1:
            n_eval = 1
        if n_eval == 0:
            return self, None
        cut = len(self) - n_eval
        return (PackedDataset(self.input_ids[:cut], self.labels[:cut]),
                PackedDataset(self.input_ids[cut:], self.labels[cut:]))

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g)

    def batch(self, start: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``[start, start+size)`` of the endless shuffled stream."""
        n = len(self)
        orders: dict[int, torch.Tensor] = {}
        idx = []
        for pos in range(start, start + size):
            epoch, i = divmod(pos, n)
            if epoch not in orders:
                orders[epoch] = self.order(epoch, seed)
            idx.append(int(orders[epoch][i]))
        index = torch.tensor(idx)
        return self.input_ids[index], self.labels[index]


def load_dataset(path: str | Path, tokenizer, seq_len: int, max_positions: int | None = None) -> PackedDataset:
    """Tokenize and pack a .jsonl/.txt file.

    Raises:
        DataError: missing/empty/malformed file, ``seq_len`` beyond the model's
            positions, or less data than one block.
    """
    if max_positions is not None and seq_len > max_positions:
        raise DataError(
            f"train.seq_len={seq_len} exceeds the model's {max_positions} positions; set train.seq_len<={max_positions}"
        )
    records = _read_records(Path(path))
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for prompt, completion in records:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids += p + c
        labels += [IGNORE] * len(p) + c
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(f"{path}: {len(ids)} tokens is less than one train.seq_len={seq_len} block; add data or lower seq_len")
    cut = n_blocks * seq_len
    return PackedDataset(
        torch.tensor(ids[:cut], dtype=torch.long).view(n_blocks, seq_len),
        torch.tensor(labels[:cut], dtype=torch.long).view(n_blocks, seq_len),
    )
