"""DESIGN.md's layer table: the pure layers never import an engine."""
from __future__ import annotations

import ast

from tests.conftest import REPO

PURE = ("schemas", "filters", "generators")
ENGINES = ("ray", "apache_beam")


def imported_modules(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_pure_layers_do_not_import_ray_or_beam():
    offenders = []
    files = [p for layer in PURE for p in (REPO / layer).rglob("*.py")]
    assert len(files) >= 4
    for path in files:
        for module in imported_modules(path.read_text()):
            if module.split(".")[0] in ENGINES:
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    assert offenders == []


def test_the_check_sees_imports_anywhere_in_a_file():
    source = "def f():\n    import ray.data\n    from apache_beam import io\n"
    assert {m.split(".")[0] for m in imported_modules(source)} == {"ray", "apache_beam"}
