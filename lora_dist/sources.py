"""Data sources: what ``data.path`` / ``data.eval_path`` name, read as a stream of raw rows.

A source is a local ``.jsonl``/``.json`` file (JSON Lines; a ``.json`` file may also hold one JSON array of
records, or an object of equal-length columns, as Alpaca's ``alpaca_data.json`` does), a ``.parquet`` file,
a dir written by ``datasets.Dataset.save_to_disk``, or a ``.txt`` file (one text record per paragraph).
``data.path`` is one of them or a list of ``{path, weight}`` mixtures (see :func:`parse_sources`).

Nothing is ever downloaded: a name that is not a local path (a hub id such as ``org/name``) is refused.
JSON Lines are read line by line (so an error names the line, and records keep exactly their fields);
parquet files a row batch at a time through pyarrow; ``save_to_disk`` dirs through
``datasets.load_from_disk``, which memory-maps their arrow files and writes nothing. Arrow cannot tell a
missing field from a null one (a table's rows share one schema), so keys whose value is null are dropped from
arrow rows, at every depth (:func:`drop_nulls`; a record's null fields count as absent in every kind,
:func:`lora_dist.chat.parse_record`). ``datasets`` stores values whose type varies between rows (messages with
and without ``tool_calls``, tool parameters) as JSON text (its ``Json`` feature); they are decoded back as
``datasets`` decodes them, nulls inside them kept, as JSON Lines keeps them.

Rows are yielded in chunks (:func:`read_chunks`), never the whole source at once (a ``.txt`` file, the
legacy format, and a ``.json`` array or column file are the exceptions: they are read in memory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_dist.errors import UserError
from lora_dist.inputs import excerpt, utf8_error

__all__ = ["CHUNK_ROWS", "DataError", "Source", "SourceSpecError", "check_source", "copies", "count_rows", "describe",
           "drop_nulls", "file_signature", "input_paths", "parse_sources", "read_chunks", "signature_json"]

#: Rows per chunk handed to a tokenization worker.
CHUNK_ROWS = 1024
#: What a source may be, for error messages.
KINDS = "a .jsonl/.json, .parquet or .txt file, or a dir written by datasets' save_to_disk"


class DataError(UserError, ValueError):
    """Data that cannot be trained on."""


class SourceSpecError(ValueError):
    """A ``data.path``/``data.eval_path`` value of the wrong shape (the config turns it into a ConfigError)."""


@dataclass(frozen=True)
class Source:
    """One source of records and how many times each of its records is used per pass over the data."""

    path: str
    weight: float = 1.0


def parse_sources(value: Any, key: str = "data.path") -> list[Source]:
    """The sources of a ``data.path``-style value: ``""`` (none), a path, or a list of paths and
    ``{"path": ..., "weight": ...}`` mappings (``weight`` a positive number, default 1).

    Raises:
        SourceSpecError: another shape, an unknown key, or a weight that is not a positive finite number.
    """
    if value in ("", None):
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Source(str(value))]
    if not isinstance(value, list) or not value:
        raise SourceSpecError(f"{key} must be a path or a non-empty list of paths and {{path, weight}} mappings, "
                              f"got {excerpt(value, 80)}")
    sources = []
    for k, item in enumerate(value):
        where = f"{key}[{k}]"
        if isinstance(item, (str, os.PathLike)):
            item = {"path": str(item)}
        if not isinstance(item, dict):
            raise SourceSpecError(f"{where} must be a path or a {{path, weight}} mapping, got {excerpt(item, 80)}")
        unknown = sorted(set(map(str, item)) - {"path", "weight"})
        if unknown:
            raise SourceSpecError(f"{where} has unknown key {excerpt(unknown[0], 40)}; a source has path and weight")
        path, weight = item.get("path"), item.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            raise SourceSpecError(f"{where}.path must be a non-empty string, got {excerpt(path, 80)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise SourceSpecError(f"{where}.weight must be a positive number (how many times each record is used "
                                  f"per pass), got {excerpt(weight, 40)}")
        sources.append(Source(path, float(weight)))
    return sources


def input_paths(data_cfg) -> list[str]:
    """Every path a run's ``data`` section reads (``data.path`` and ``data.eval_path`` sources)."""
    return [s.path for key in ("path", "eval_path") for s in parse_sources(getattr(data_cfg, key), f"data.{key}")]


def copies(weight: float, source_index: int, row: int) -> int:
    """How many times row ``row`` of source ``source_index`` is used per pass: ``floor(weight)``, plus one
    for a fixed, seeded draw of about ``weight - floor(weight)`` of the rows (the same on every run)."""
    whole = math.floor(weight)
    frac = weight - whole
    if frac == 0:
        return whole
    digest = hashlib.blake2b(f"lora_dist-mix:{source_index}:{row}".encode(), digest_size=8).digest()
    return whole + (int.from_bytes(digest, "little") / 2**64 < frac)


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            example = "train" if "train" in splits or not splits else splits[0]
            raise DataError(f"{path} holds a DatasetDict (splits {', '.join(splits) or 'none'}); point the path at "
                            f"one split's dir, e.g. {path / example}")
        if (path / "state.json").is_file():
            return "arrow"
        held = sorted(str(f) for f in path.rglob("*") if f.suffix in (".jsonl", ".json", ".parquet", ".txt")
                      and f.is_file())
        if held:  # a Hub snapshot's data/train-0000i-of-0000N.parquet, a Spark output dir
            listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise DataError(f"{path} is a dir of {len(held)} data files, not one written by datasets' save_to_disk; "
                            f"list the files as a mixture: data.path=[{listed}]")
        raise DataError(f"{path} is a dir but not one written by datasets' save_to_disk (no state.json); "
                        f"use {KINDS}")
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".txt":
        return "txt"
    raise DataError(f"data.path {str(path)!r}: unsupported file type {path.suffix!r}; use {KINDS}")


def check_source(source: Source) -> str:
    """The kind of a source (``jsonl``, ``txt``, ``parquet``, ``arrow``), checking it exists.

    Raises:
        DataError: a missing path (a hub id is refused: nothing is downloaded) or an unsupported kind.
    """
    path = Path(source.path)
    if not path.exists():
        hub = "" if path.is_absolute() or path.suffix or source.path.count("/") != 1 else (
            "; lora_dist reads local files only: save the hub dataset first, e.g. "
            f"datasets.load_dataset({source.path!r}, split='train').save_to_disk(DIR), and point data.path at DIR")
        raise DataError(f"data.path {source.path!r} not found; point data.path at {KINDS}{hub}")
    return _kind(path)


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def file_signature(source: Source) -> list[tuple[str, int, int]]:
    """``(absolute path, size, mtime_ns)`` of every file a source reads: the part of a cache key that
    changes when the data does."""
    out = []
    for f in _files(Path(source.path)):
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out


def _not_utf8(path: Path) -> DataError:
    """The one-line error for a data file that is not UTF-8, naming its first bad byte's line and column."""
    with path.open("rb") as f:
        head = f.read(2)
    if head in (b"\xff\xfe", b"\xfe\xff"):
        return DataError(f"{path}: UTF-16 text; convert the file to UTF-8 (e.g. iconv -f utf-16 -t utf-8)")
    where = "somewhere"
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = utf8_error(raw, e, first_line=lineno)
                break
    return DataError(f"{path}: not UTF-8 text ({where}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def drop_nulls(value: Any) -> Any:
    """An arrow row as the record it came from: keys whose value is null dropped, at every depth (arrow writes
    null for a field a row lacks)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _json_decoded(feature: Any, value: Any) -> Any:
    """``value`` of a ``datasets`` ``feature`` with the values its ``Json`` features hold as JSON text decoded."""
    from datasets.features import Json

    if value is None:
        return None
    if isinstance(feature, Json):
        return json.loads(value) if isinstance(value, str) else value
    if isinstance(feature, dict) and isinstance(value, dict):
        return {k: _json_decoded(feature[k], v) if k in feature else v for k, v in value.items()}
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    if inner is not None and isinstance(value, list):
        return [_json_decoded(inner, v) for v in value]
    return value


def _has_json(feature: Any) -> bool:
    from datasets.features import Json

    if isinstance(feature, Json):
        return True
    if isinstance(feature, dict):
        return any(_has_json(f) for f in feature.values())
    inner = getattr(feature, "feature", None)
    return inner is not None and _has_json(inner)


#: The fields records are read by (:func:`lora_dist.chat.parse_record`): a column object names some of them.
_RECORD_FIELDS = {"messages", "conversations", "instruction", "input", "output", "context", "response", "text",
                  "prompt", "completion"}


def _columns(value: Any) -> list[dict] | None:
    """The records of an object of equal-length columns (``{"instruction": [...], "output": [...]}``); None for
    anything else, a record included (a ``messages`` list holds objects, a column of conversations lists)."""
    if not isinstance(value, dict) or not value or not set(value) & _RECORD_FIELDS:
        return None
    columns = list(value.values())
    if not columns[0] or not all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
        return None
    if any(isinstance(item, dict) for c in columns for item in c[:1]):
        return None
    return [dict(zip(value, row)) for row in zip(*columns)]


def _json_file(path: Path) -> list | None:
    """The records of a ``.json`` file that holds one JSON array of them, or one object of equal-length columns;
    None for JSON Lines (one whole JSON record per line)."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
            rest = any(line.strip() for line in f)
            try:
                head = json.loads(first)
            except json.JSONDecodeError:
                head = None  # a value over several lines (or invalid JSON: said below)
            except RecursionError:
                raise DataError(f"{path}:1: JSON nested too deeply to be a record") from None
            if head is not None and not isinstance(head, list) and (rest or _columns(head) is None):
                return None
            f.seek(0)
            try:
                value = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json file holds JSON Lines (one "
                                "record per line), one JSON array of records, or an object of columns") from None
            except RecursionError:
                raise DataError(f"{path}: JSON nested too deeply to be records") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if isinstance(value, list):
        return value
    columns = _columns(value)
    return columns if columns is not None else [value]


def _json_records(path: Path, kind: str) -> list | None:
    """:func:`_json_file`'s records of a ``.json`` file, or of a ``.jsonl`` holding one JSON array (HF datasets' json
    loader reads either whatever the name); None for JSON Lines and the other kinds."""
    if kind != "jsonl" or (path.suffix != ".json" and not _opens_an_array(path)):
        return None
    return _json_file(path)


def record_place(path: str | os.PathLike, kind: str, pos: int) -> str:
    """Where a source's record ``pos`` (as :func:`read_chunks` numbers it) is, for an error: ``FILE:LINE`` in JSON
    Lines, ``FILE: record N`` in a JSON array or columns, ``FILE: paragraph N`` in a ``.txt`` file, ``FILE: row N``
    in parquet and ``save_to_disk`` (from 0)."""
    path = Path(path)
    if kind == "txt":
        return f"{path}: paragraph {pos}"
    if kind == "jsonl":
        return f"{path}: record {pos}" if _json_records(path, kind) is not None else f"{path}:{pos}"
    return f"{path}: row {pos}"


def _opens_an_array(path: Path) -> bool:
    """Whether the file's first character but whitespace (and a BOM) opens a JSON array."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            while (c := f.read(1)) and c.isspace():
                pass
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    return c == "["


def read_chunks(source: Source, chunk_rows: int = CHUNK_ROWS) -> Iterator[list[tuple[int, Any]]]:
    """A source's rows in order, ``chunk_rows`` at a time, as ``(position, row)``.

    ``position`` is the line number (JSON Lines, from 1), the paragraph number (``.txt``, from 1) or the
    row index (arrow, from 0). ``row`` is the line's text (parsed by the tokenization worker) or a dict.

    Raises:
        DataError: a file that is not UTF-8 or not readable as its kind.
    """
    path = Path(source.path)
    kind = check_source(source)
    chunk: list[tuple[int, Any]] = []
    records = _json_records(path, kind)
    if records is not None:  # a JSON array (or columns): record k is at position k, from 1, as JSON text (what the
        for start in range(0, len(records), chunk_rows):  # tokenization workers parse: an element is never re-read)
            yield [(start + k, json.dumps(r)) for k, r in enumerate(records[start:start + chunk_rows], 1)]
    elif kind == "jsonl":
        try:
            with path.open(encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        chunk.append((lineno, line))
                        if len(chunk) == chunk_rows:
                            yield chunk
                            chunk = []
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    elif kind == "txt":
        for k, para in enumerate(_paragraphs(path), 1):
            chunk.append((k, {"text": para}))
            if len(chunk) == chunk_rows:
                yield chunk
                chunk = []
    else:
        row = 0
        for table, features in _arrow_batches(path, kind, chunk_rows):
            rows = [drop_nulls(r) for r in table.to_pylist()]
            if features is not None:  # after: the nulls inside JSON text are the record's own
                rows = [_json_decoded(features, r) for r in rows]
            yield list(enumerate(rows, row))
            row += len(rows)
    if chunk:
        yield chunk


def count_rows(source: Source) -> int:
    """How many rows :func:`read_chunks` yields for a source, without parsing them (JSON Lines are counted a
    line at a time, arrow a batch at a time).

    Raises:
        DataError: as :func:`read_chunks`.
    """
    path = Path(source.path)
    kind = check_source(source)
    records = _json_records(path, kind)
    if records is not None:
        return len(records)
    if kind == "jsonl":
        try:
            with path.open(encoding="utf-8-sig") as f:
                return sum(1 for line in f if line.strip())
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    if kind == "txt":
        return sum(1 for _ in _paragraphs(path))
    return sum(batch.num_rows for batch, _ in _arrow_batches(path, kind, 1 << 16))


def _paragraphs(path: Path) -> Iterator[str]:
    """The paragraphs of a ``.txt`` file (read whole): text between blank lines (one or more, of nothing but spaces
    and tabs), without the line breaks around it or the spaces that end it (a first line's indent is kept)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    return (p.strip("\n").rstrip() for p in re.split(r"\n(?:[ \t]*\n)+", text) if p.strip())


def _arrow_batches(path: Path, kind: str, chunk_rows: int):
    """``(record batch, features)`` of a parquet file (pyarrow) or a ``save_to_disk`` dir
    (``datasets.load_from_disk``); ``features`` are the ``datasets`` features where some hold JSON text, else
    None."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            file = pq.ParquetFile(path)
            schema = file.schema_arrow
            try:  # the datasets features it was written with (a type this datasets lacks: the rows as stored)
                features = (datasets.Features.from_arrow_schema(schema)
                            if schema.metadata and b"huggingface" in schema.metadata else None)
            except Exception:
                features = None
            batches = file.iter_batches(batch_size=chunk_rows)
        else:
            dataset = datasets.load_from_disk(str(path))
            features = dataset.features
            batches = dataset.with_format("arrow").iter(batch_size=chunk_rows)
        features = features if features is not None and _has_json(features) else None
        for batch in batches:
            yield batch, features
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; a truncated file an OSError
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot be read as {'parquet' if kind == 'parquet' else 'a save_to_disk dir'} "
                        f"({excerpt(' '.join(str(e).split()), 160)}); rewrite it (e.g. Dataset.to_parquet)") from None


def describe(sources: list[Source]) -> str:
    """The sources, for logs: ``a.jsonl`` or ``a.jsonl x2, b.parquet x0.5``."""
    return ", ".join(s.path if s.weight == 1 else f"{s.path} x{s.weight:g}" for s in sources)


def signature_json(sources: list[Source]) -> str:
    """The sources and their files' signatures as one JSON string (part of a cache key)."""
    return json.dumps([[s.path, s.weight, file_signature(s)] for s in sources])
