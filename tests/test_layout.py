"""The floors of the package: the training application (surogate/training/) sits on the compiler library,
and no module below it imports it, not even inside a function (kernels/tuning once did, for the cache
dir), so that the library imports, and is tested, without the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

import surogate

PACKAGE = Path(surogate.__file__).resolve().parent
ENTRY_POINT = Path("__main__.py")  # `python -m surogate`: the console script, the top floor by definition


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function, with `from a import b` as `a.b` too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_below_training_imports_it():
    below = [p for p in PACKAGE.rglob("*.py")
             if p.relative_to(PACKAGE).parts[0] != "training" and p.relative_to(PACKAGE) != ENTRY_POINT]
    assert len(below) > 30 and PACKAGE / "compiler.py" in below  # the walk found the library
    found = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.split(".")[:2] == ["surogate", "training"])
             for p in below}
    assert {module: names for module, names in found.items() if names} == {}


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def cache_dir():\n    from surogate.training import tokenizer\n    return tokenizer\n")
    assert "surogate.training.tokenizer" in _imports(lazy)
