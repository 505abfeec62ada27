"""The layering the README's module table promises: a module imports only modules above it.

The table in README.md ("Architecture") is the order; this test reads it, reads every module's
imports with `ast`, and fails on an import that points down the list, on a module missing from
the table and on a table row naming a module that does not exist. Imports made only for type
checking (`if TYPE_CHECKING:`) count too: a type is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "neuronetz"
# Entry points that only start the program; they sit below everything by nature.
ENTRY_POINTS = {"__init__", "__main__"}


def table_order() -> list[str]:
    """Module names in the order of the README's module table (`a.py` + `b.lua` rows give `a`)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    order: list[str] = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        order += [name for name in re.findall(r"`([a-z0-9_]+)\.py`", first_cell) if name not in order]
    return order


def imported_modules(path: Path) -> set[str]:
    """The `neuronetz` modules that `path` imports, by their short names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            if node.module == "neuronetz":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("neuronetz."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("neuronetz."))
    return found - {"__version__"}


def test_every_module_is_in_the_readme_table_and_every_row_is_a_module() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - ENTRY_POINTS
    order = table_order()
    assert sorted(modules - set(order)) == [], "modules missing from the README's module table"
    assert sorted(set(order) - modules) == [], "README rows naming modules that do not exist"


def test_no_module_imports_a_module_below_it_in_the_readme_table() -> None:
    order = table_order()
    rank = {name: index for index, name in enumerate(order)}
    upward = [
        f"{path.stem}.py imports {name}.py"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem in rank
        for name in sorted(imported_modules(path))
        if name in rank and rank[name] >= rank[path.stem]
    ]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an import of a lower module is found, a type-only one too."""
    module = tmp_path / "sample.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nfrom neuronetz import config, errors\n"
        "if TYPE_CHECKING:\n    from neuronetz.auth import KeyRecord\nimport neuronetz.db\n"
    )
    assert imported_modules(module) == {"config", "errors", "auth", "db"}
