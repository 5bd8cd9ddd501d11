"""Every Python file of the project compiles without a warning: an invalid escape sequence in a string (a
docstring's ``\\ ``) is a DeprecationWarning on Python 3.11, a SyntaxWarning from 3.12, and will be an error."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for folder in ("lora_dist", "tests", "scripts", "bench", "launchers")
                 for path in (REPO / folder).rglob("*.py"))


def test_the_sources_are_found():
    assert len(SOURCES) > 100 and REPO / "lora_dist" / "chat.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_compiles_without_a_warning(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_bytes(), str(path), "exec", dont_inherit=True)


def test_an_invalid_escape_is_caught():
    with warnings.catch_warnings(), pytest.raises((DeprecationWarning, SyntaxWarning, SyntaxError)):
        warnings.simplefilter("error")
        compile('"""a :meth:`f`\\ d call"""\n', "<doc>", "exec", dont_inherit=True)
