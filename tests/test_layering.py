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
    targets = []  # (module, whether a name defined in it is taken: then even its own submodules need it whole)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [(alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append((submodule, False) if submodule in modules else (base, True))
    out = set()
    for target, takes_a_name in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if takes_a_name and target.startswith("lora_dist") and target != name:
            out.add(target)  # ``from lora_dist.pkg import Name`` inside lora_dist.pkg: its __init__ must have run
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


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "lora_dist"


def test_the_check_sees_a_cycle_made_by_an_import_inside_a_function(tmp_path):
    """The rule can fail: two modules that import each other, one of them only inside a function."""
    package = _package(tmp_path, {
        "lora_dist/__init__.py": "",
        "lora_dist/low.py": "def f():\n    from lora_dist.sub.high import g\n",
        "lora_dist/sub/__init__.py": "from lora_dist.sub.high import g\n",
        "lora_dist/sub/high.py": "from lora_dist import low\n",
        "lora_dist/apart.py": "import lora_dist.low\n",
    })
    assert _cycles(package) == [["lora_dist.low", "lora_dist.sub", "lora_dist.sub.high"]]


def test_the_check_sees_a_module_that_takes_a_name_from_its_own_package(tmp_path):
    """``from lora_dist.sub import Name`` inside ``lora_dist/sub/`` needs the package's ``__init__`` to have run: a
    cycle where the ``__init__`` imports that module (Python's "partially initialized module"), also at the top."""
    package = _package(tmp_path, {
        "lora_dist/__init__.py": "from lora_dist.top import T\n",
        "lora_dist/top.py": "from lora_dist import T2\nT = 1\n",
        "lora_dist/sub/__init__.py": "from lora_dist.sub.x import K\n",
        "lora_dist/sub/x.py": "from lora_dist.sub import K2\nK = 1\n",
        "lora_dist/sub/y.py": "from lora_dist.sub import x\n",  # a submodule: no name taken from the package
    })
    assert _cycles(package) == [["lora_dist", "lora_dist.top"], ["lora_dist.sub", "lora_dist.sub.x"]]
