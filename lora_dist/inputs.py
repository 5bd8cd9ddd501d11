"""Reading what users hand in: bounded excerpts for error messages; YAML, text and JSON read within limits.

Every error about a user's value shows at most :data:`EXCERPT_CHARS` characters of it,
at a cost bounded by that length whatever the value's size (a 580 MB list prints as a
short ``[[...], ...]``). Metadata files (``config.json``, indexes, ``adapter_config.json``)
are read with a size limit, decoded as UTF-8 and parsed as JSON. YAML (run configs and
overrides) is parsed with limits on size, nesting and alias expansion checked before any
value is built, so a 373-byte alias bomb costs nothing. A key given twice in one mapping is
refused (PyYAML would keep the last), and a number or boolean keeps the text it was written as
(:func:`source_text`), so a text key reads ``0042``, ``1.10`` or ``yes`` as written. Any failure is the
caller's one-line error type naming the file, the position and the fix, never a
``UnicodeDecodeError`` or ``RecursionError`` traceback.
"""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "EXCERPT_CHARS",
    "MAX_CONFIG_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "clip",
    "excerpt",
    "parse_yaml",
    "plain",
    "read_json",
    "read_text",
    "source_text",
    "YAMLBool",
    "utf8_error",
]

#: Longest excerpt of a value an error message shows.
EXCERPT_CHARS = 200
#: Largest metadata file (config.json, an index, adapter_config.json) read; real ones are well under 1 MB.
MAX_METADATA_BYTES = 16 << 20
#: A config file or one override larger than this is refused before it is parsed (real configs are a few KB).
MAX_CONFIG_BYTES = 256 << 10
#: Deepest nesting of mappings and lists a YAML config may have (its sections are level 2).
MAX_YAML_DEPTH = 16
#: Most YAML nodes a config may hold with every alias expanded (a 373-byte "billion laughs" holds 10^8).
MAX_YAML_NODES = 20_000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxdict = 8
_REPR.maxstring = EXCERPT_CHARS
_REPR.maxlong = 40
_REPR.maxother = EXCERPT_CHARS


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)``, cut to at most ``limit`` characters at a cost bounded by ``limit``.

    Args:
        value: any value, e.g. a config value from YAML (possibly a huge nested list).
        limit: the longest result.

    Returns:
        The (possibly shortened) repr; a cut one ends with ``...``.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. an int with more digits than Python converts to a string
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (a cut one ends with ``...``)."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def utf8_error(data: bytes, error: UnicodeDecodeError, first_line: int = 1) -> str:
    """Where ``data`` stops being UTF-8: ``byte 0xff at line 3, column 7`` (1-based)."""
    offset = error.start
    line = first_line + data.count(b"\n", 0, offset)
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"byte 0x{data[offset]:02x} at line {line}, column {column}"


def read_text(path: str | os.PathLike, error: type[Exception], what: str,
              max_bytes: int = MAX_METADATA_BYTES) -> str:
    """A small UTF-8 text file's contents, or ``error`` in one line.

    Args:
        path: the file.
        error: the exception type to raise (the caller's user-error type).
        what: what the file is, for the message (``"the model config"``).
        max_bytes: refuse larger files before reading them.

    Raises:
        error: the file is unreadable, larger than ``max_bytes`` or not UTF-8.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as e:
        raise error(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    if size > max_bytes or len(data) > max_bytes:
        raise error(f"{path}: {what} is {max(size, len(data))} bytes, more than the {max_bytes} allowed; "
                    "is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({utf8_error(data, e)}); save it as UTF-8") from None


def read_json(path: str | os.PathLike, error: type[Exception], what: str,
              max_bytes: int = MAX_METADATA_BYTES) -> Any:
    """A small JSON file's value, or ``error`` in one line (see :func:`read_text`).

    Raises:
        error: the file is unreadable, too large, not UTF-8, not JSON or nested too deeply.
    """
    text = read_text(path, error, what, max_bytes)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                    "restore or re-save the file") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to be a real one; restore or re-save the file") from None


class _TooCostly(Exception):
    """A YAML document over the limits on what a config may cost."""


class _Repeated(Exception):
    """A key given twice in one YAML mapping."""


class _Int(int):
    """An integer read from YAML, with the text it was written as (``0042``, ``0x10``, ``1:30``) in ``.text``."""

    text: str


class _Float(float):
    """A float read from YAML, with the text it was written as (``1.10``, ``1.5e3``) in ``.text``."""

    text: str


class YAMLBool(str):
    """A word YAML 1.1 reads as a boolean and YAML 1.2 as text (``yes``, ``No``, ``on``, ``OFF``), as written;
    :attr:`value` is the boolean. A flag takes it as that, a text key (``tracking.run_name: yes``) as the text
    (a ``bool`` cannot keep its text). ``true`` and ``false`` stay booleans."""

    value: bool

    @property
    def text(self) -> str:
        return str.__str__(self)


def source_text(value: Any) -> str | None:
    """The text a number or boolean parsed by :func:`parse_yaml` was written as (``"0042"`` for 34, ``"yes"`` for
    true), else None."""
    return value.text if isinstance(value, (_Int, _Float, YAMLBool)) else None


def plain(value: Any) -> Any:
    """``value`` with every number and boolean :func:`parse_yaml` built made a plain ``int``/``float``/``bool``, in
    lists and dicts too."""
    if isinstance(value, YAMLBool):
        return value.value
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return value


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with limits on what a document may cost, checked before any value is built.

    Composing counts nodes and nesting (so scanning stops early), and before constructing, the
    node graph is measured with every alias expanded (memoized: linear in the graph, not in the
    expansion), so an alias bomb is refused without ever being expanded.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):  # PyYAML's hook
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooCostly(f"nested deeper than {MAX_YAML_DEPTH} levels")
            if self._nodes > MAX_YAML_NODES:
                raise _TooCostly(f"more than {MAX_YAML_NODES} values")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor):  # PyYAML's hook
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # a merge key (<<) may repeat, and its keys give way to the mapping's own
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                raise _Repeated(f"{clip(key.value, 80)!r} is given twice (lines {first.start_mark.line + 1} and "
                                f"{key.start_mark.line + 1}), and YAML would keep only the second; merge the two "
                                "into one")
        return node

    def construct_document(self, node):  # PyYAML's hook
        _check_expansion(node)
        return super().construct_document(node)

    def construct_yaml_int(self, node):  # PyYAML's constructor, keeping the text
        number = _Int(super().construct_yaml_int(node))
        number.text = node.value
        return number

    def construct_yaml_float(self, node):  # PyYAML's constructor, keeping the text
        number = _Float(super().construct_yaml_float(node))
        number.text = node.value
        return number

    def construct_yaml_bool(self, node):  # PyYAML's constructor, keeping the text of a YAML 1.1-only word
        value = super().construct_yaml_bool(node)
        if node.value.lower() in ("true", "false"):  # a boolean in YAML 1.2 as well
            return value
        word = YAMLBool(node.value)
        word.value = value
        return word


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)
_BoundedLoader.add_constructor("tag:yaml.org,2002:bool", _BoundedLoader.construct_yaml_bool)
# A config has no dates: 2024-01-01 (an output.dir, a run name) stays the text it is.
_BoundedLoader.add_constructor("tag:yaml.org,2002:timestamp", _BoundedLoader.construct_scalar)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose alias-expanded tree is too large, too deep or infinite."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded node count, height)
    active: set[int] = set()
    expanded = "once its aliases are expanded"

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise _TooCostly(f"nested deeper than {MAX_YAML_DEPTH} levels {expanded}")
        key = id(node)
        if key in active:
            raise _TooCostly("an alias refers to the value that contains it (an infinite value)")
        if key not in measured:
            active.add(key)
            count, height = 1, 0
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = []
            for child in children:
                n, h = visit(child, depth + 1)
                count, height = count + n, max(height, h + 1)
                if count > MAX_YAML_NODES:
                    raise _TooCostly(f"more than {MAX_YAML_NODES} values {expanded}")
            active.discard(key)
            measured[key] = (count, height)
        count, height = measured[key]
        if depth + height > MAX_YAML_DEPTH:
            raise _TooCostly(f"nested deeper than {MAX_YAML_DEPTH} levels {expanded}")
        return count, height

    visit(root, 1)


def parse_yaml(text: str, error: type[Exception], where: str) -> Any:
    """Parse one YAML document safely (no Python objects) and within the limits on what a config may cost.

    Args:
        text: the document.
        error: the exception type to raise (the caller's user-error type).
        where: what it is, for messages (a file path, or ``override 'lora.r'``).

    Returns:
        The value. Its numbers are ``int``/``float`` subclasses that keep the text they were written as, its
        booleans :class:`YAMLBool` words (:func:`source_text`; :func:`plain` makes them plain values); a date
        stays its text.

    Raises:
        error: larger than :data:`MAX_CONFIG_BYTES`, more than :data:`MAX_YAML_NODES` values or
            deeper than :data:`MAX_YAML_DEPTH` levels with its aliases expanded, a recursive
            alias, a key given twice in one mapping, or a value Python cannot hold (an integer
            with thousands of digits).
        yaml.YAMLError: not valid YAML (the caller decides what that means).
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise error(f"{where}: {len(text)} characters is more than the {MAX_CONFIG_BYTES} a config may have")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _TooCostly as e:
        raise error(f"{where}: refused: {e}; a config is a few plain sections of values") from None
    except _Repeated as e:
        raise error(f"{where}: {e}") from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. int() of 5000 digits
        problem = "a number has thousands of digits" if "digits" in str(e) else clip(str(e), 120)
        raise error(f"{where}: a value cannot be read ({problem}); check the value") from None
    finally:
        loader.dispose()
