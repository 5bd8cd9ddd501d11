"""The package is layered: no module imports, even inside a function, a module that imports it back.

An import cycle hides behind imports made inside functions; it works until someone moves one to the top
of a file, and it makes every module of the cycle depend on all the others. Importing ``lora_dist.a.b``
also runs ``lora_dist/a/__init__.py``, so that counts as importing the package too (but for a module
of the package itself, which Python has already started).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_dist"


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lora_dist modules that importing ``name`` (or calling its functions) runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        while target.startswith("lora_dist") and not name.startswith(target + ".") and target != name:
            out.add(target)  # the module and every package above it that this module is not inside
            target = target.rpartition(".")[0]
    return out


def _cycles(package: Path = PACKAGE) -> list[list[str]]:
    modules = _modules(package)
    edges = {name: _imported(name, path, modules) for name, path in modules.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reached = {name: reach(name) for name in modules}
    cycles = {frozenset(m for m in reached[name] if name in reached[m]) for name in modules if name in reached[name]}
    return sorted(sorted(c) for c in cycles)


def test_no_module_imports_itself_back():
    cycles = _cycles()
    assert not cycles, "modules that import each other (a cycle each): " + "; ".join(", ".join(c) for c in cycles)


def test_the_check_sees_a_cycle_made_by_an_import_inside_a_function(tmp_path):
    """The rule can fail: two modules that import each other, one of them only inside a function."""
    package = tmp_path / "lora_dist"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from lora_dist.sub.high import g\n")
    (package / "sub" / "__init__.py").write_text("from lora_dist.sub.high import g\n")
    (package / "sub" / "high.py").write_text("from lora_dist import low\n")
    (package / "apart.py").write_text("import lora_dist.low\n")
    assert _cycles(package) == [["lora_dist.low", "lora_dist.sub", "lora_dist.sub.high"]]
