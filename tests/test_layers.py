"""DESIGN.md's layer table, in full: each top-level folder imports only the folders below it in the table
(so no two folders import each other, directly or in a circle), and the pure layers never import an engine."""
from __future__ import annotations

import ast

from tests.conftest import REPO

PURE = ("schemas", "filters", "generators")
ENGINES = ("ray", "apache_beam")
# folder -> the project folders it may import (DESIGN.md: imports only point down); bench sits above everything
MAY_IMPORT = {
    "schemas": set(),
    "filters": {"schemas"},
    "generators": {"schemas", "filters"},
    "trainer": {"schemas", "filters"},
    "evals": {"schemas", "filters", "trainer"},
    "pipelines": {"schemas", "filters", "generators", "trainer", "evals"},
    "infra": {"schemas", "filters", "generators", "trainer", "evals", "pipelines"},
    "bench": {"schemas", "filters", "generators", "trainer", "evals", "pipelines", "infra"},
}


def imported_modules(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def folder_imports(folder: str) -> dict[str, set[str]]:
    """Each file of `folder` -> the other project folders it imports (anywhere in the file, lazily or not)."""
    found = {}
    for path in (REPO / folder).rglob("*.py"):
        tops = {m.split(".")[0] for m in imported_modules(path.read_text())}
        found[str(path.relative_to(REPO))] = (tops & set(MAY_IMPORT)) - {folder}
    return found


def test_pure_layers_do_not_import_ray_or_beam():
    offenders = []
    files = [p for layer in PURE for p in (REPO / layer).rglob("*.py")]
    assert len(files) >= 4
    for path in files:
        for module in imported_modules(path.read_text()):
            if module.split(".")[0] in ENGINES:
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    assert offenders == []


def test_every_folder_imports_only_the_layers_below_it():
    offenders = [f"{path} imports {other}" for folder, allowed in MAY_IMPORT.items()
                 for path, others in folder_imports(folder).items() for other in sorted(others - allowed)]
    assert offenders == []
    # the table is checked against what is there: every project folder is in it, and each one is used
    folders = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} - {"tests"}
    assert folders == set(MAY_IMPORT)


def test_the_check_sees_imports_anywhere_in_a_file():
    source = "def f():\n    import ray.data\n    from apache_beam import io\n"
    assert {m.split(".")[0] for m in imported_modules(source)} == {"ray", "apache_beam"}
