"""Where a merged checkpoint may be written, and what ``--overwrite`` may replace there.

The contract (``docs/safety.md``, ``docs/export.md``): an export creates its
output dir, and replaces an existing one only with ``--overwrite`` and only if
lora_dist wrote it, so nothing of the user's is ever lost.

* The output is never an input: not the base checkpoint, the adapter or a run's
  checkpoints, nor a dir that contains one of them or lies inside one,
  ``--overwrite`` or not (:func:`lora_dist.outputs.check_not_an_input`).
* An existing output is replaced only with ``--overwrite``, and only if it is a
  merged checkpoint lora_dist wrote (:func:`foreign_entries`): a real dir (not a
  link) holding nothing but ``config.json``, the index, ``model*.safetensors``
  files whose headers carry :data:`~lora_dist.export.sources.MERGED_FROM_KEY`,
  and the files the export copies from the base (:func:`copied_files`: its
  named chat templates in :data:`TEMPLATES_DIR` too). An empty dir may be
  replaced too: nothing is lost.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from lora_dist.export.errors import OutputExistsError, OutputRefusedError
from lora_dist.safetensors_file import SafetensorsFormatError, read_header
from lora_dist.export.sources import MERGED_FROM_KEY
from lora_dist.model_dir import SAFE_INDEX
from lora_dist.outputs import CHAT_TEMPLATE_FILE, OutputError, check_not_an_input, is_adapter_dir, is_model_dir

__all__ = ["GENERATION_CONFIG", "TEMPLATES_DIR", "check_output", "copied_files", "foreign_entries", "is_merged_export",
           "is_weight_file"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")
#: The weight files a merged export writes: ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``.
_EXPORT_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def is_weight_file(name: str) -> bool:
    """Whether a base checkpoint's file holds weights (or an index, or an adapter): the export does not copy it."""
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json") or name.startswith("adapter_")


#: The subdir where transformers saves a tokenizer's named chat templates (``<name>.jinja``): copied too.
TEMPLATES_DIR = "additional_chat_templates"
#: The generation config: copied, with the chat template's end-of-turn tokens added to its ``eos_token_id``
#: (written where the base has none).
GENERATION_CONFIG = "generation_config.json"


def _copied(name: str) -> bool:
    return not name.startswith(".") and not is_weight_file(name)


def copied_files(base_dir: str | os.PathLike) -> list[Path]:
    """The base checkpoint's files a merged export copies: tokenizer, generation config and other non-weight files,
    and the named chat templates in :data:`TEMPLATES_DIR`; the export writes each at its path relative to
    ``base_dir``.

    ``config.json`` is not among them: the export writes its own (with the output dtype).
    """
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        return []
    files = [f for f in sorted(base_dir.iterdir()) if f.is_file() and _copied(f.name) and f.name != "config.json"]
    templates = base_dir / TEMPLATES_DIR
    if templates.is_dir():
        files += [f for f in sorted(templates.iterdir()) if f.is_file() and _copied(f.name)]
    return files


def _has_export_metadata(path: Path) -> bool:
    try:
        metadata, _ = read_header(path)
    except (OSError, SafetensorsFormatError):
        return False
    return MERGED_FROM_KEY in metadata


def foreign_entries(out: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> list[str]:
    """What in the dir ``out`` a merged export of ``base_dir`` would not have written; empty if it is one.

    Args:
        out: an existing dir.
        base_dir: the base checkpoint of the export about to replace it (exactly its copied files are
            expected); None accepts any file a base could have had copied (not hidden, not weights).

    Returns:
        One short phrase per problem (entries lora_dist does not write, weights without its metadata,
        no weights at all); empty for a merged checkpoint lora_dist wrote, or an empty dir.
    """
    out = Path(out)
    entries = sorted(out.iterdir())
    if not entries:
        return []
    copied = None if not base_dir else {f.relative_to(base_dir).as_posix() for f in copied_files(base_dir)}
    templates = out / TEMPLATES_DIR
    if not templates.is_symlink() and templates.is_dir():  # the named chat templates: copied files like the rest
        entries = [e for e in entries if e.name != TEMPLATES_DIR] + sorted(templates.iterdir())
    weights, unknown = [], []
    for entry in entries:
        name = entry.relative_to(out).as_posix()
        if entry.is_symlink() or not entry.is_file():
            unknown.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
        elif _EXPORT_WEIGHTS.fullmatch(name):
            weights.append(entry)
        elif name in ("config.json", SAFE_INDEX, CHAT_TEMPLATE_FILE, GENERATION_CONFIG):  # written by the export
            continue
        elif copied is not None and name not in copied:
            unknown.append(name)
        elif copied is None and not _copied(entry.name):
            unknown.append(name)
    problems = []
    if unknown:
        shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        problems.append(f"it holds {shown}, which lora_dist does not write")
    unmarked = [w.name for w in weights if not _has_export_metadata(w)]
    if unmarked:
        problems.append(f"{unmarked[0]} carries no lora_dist metadata (a model from elsewhere?)")
    if not weights:
        problems.append("it holds no merged weights")
    if not (out / "config.json").is_file():
        problems.append("it has no config.json")
    return problems


def is_merged_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a non-empty merged checkpoint dir lora_dist wrote (any base's copied files allowed)."""
    path = Path(path)
    return not path.is_symlink() and path.is_dir() and any(path.iterdir()) and not foreign_entries(path)


def _kind(path: Path) -> str:
    if is_adapter_dir(path):
        return "an adapter dir"
    if is_model_dir(path):
        return "a model dir"
    return "a dir"


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, overwrite: bool,
                 base_dir: str | os.PathLike | None, what: str) -> None:
    """Refuse an output the export may not write; call on rank 0 before any work, and again before publishing.

    Args:
        out: the output dir.
        inputs: the paths the export reads (base, adapter, a run's checkpoints); None entries are skipped.
        overwrite: whether replacing an existing output was asked for.
        base_dir: the base checkpoint (its non-weight files are expected in an earlier export of it).
        what: how the output is named to the user (``--out``).

    Raises:
        OutputRefusedError: ``out`` is, contains or lies inside an input, or exists and is not a merged
            checkpoint lora_dist wrote (a user's dir, a model from elsewhere, a file, a link).
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
    """
    try:
        check_not_an_input(out, inputs, what)
    except OutputError as e:
        raise OutputRefusedError(str(e)) from None
    path = Path(out)
    if not os.path.lexists(path):
        above = next(parent for parent in path.absolute().parents if os.path.lexists(parent))
        if not above.is_dir():
            raise OutputRefusedError(f"{what} {str(out)!r} lies under {str(above)!r}, which is a file, not a "
                                     f"directory: choose another {what}")
        return
    if not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass --overwrite (or output.overwrite=true) to "
                                "replace it (only a merged checkpoint lora_dist wrote is replaced)")
    fix = f"move it away or choose another {what}"
    if path.is_symlink():
        raise OutputRefusedError(f"{what} {str(out)!r} is a symlink; --overwrite never replaces a link: pass the dir "
                                 "it points to, or remove the link")
    if not path.is_dir():
        raise OutputRefusedError(f"{what} {str(out)!r} is a file, not a merged checkpoint lora_dist wrote; "
                                 f"--overwrite replaces only those: {fix}")
    problems = foreign_entries(path, base_dir)
    if problems:
        raise OutputRefusedError(f"{what} {str(out)!r} is {_kind(path)} lora_dist did not write ({problems[0]}); "
                                 f"--overwrite replaces only a merged checkpoint lora_dist wrote: {fix}")
