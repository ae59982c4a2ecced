"""The architecture's boundaries, read from the code's own imports: data flows down one way
(HTTP -> serving -> engine -> runner), the engine knows nothing of HTTP or the wire format, and nothing
above the engine touches tensors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.server_process import ROOT

# A unit may import only units of a lower rank (and its own modules): that rules out cycles between units.
RANKS = {
    "main": 7,
    "app": 6,
    "api": 5,
    "serving": 4,
    "speech": 3,
    "model_manager": 2,
    "batching": 1,
    "converters": 1,
    "kernels": 0,
    "config": 0,
    "models": 0,
}
HTTP = {"fastapi", "starlette", "uvicorn"}
FORBIDDEN = {
    "batching": HTTP | {"pydantic", "models", "config"},
    "converters": HTTP | {"pydantic"},
    "kernels": HTTP | {"pydantic", "models", "config"},
    "model_manager": HTTP,
    "speech": HTTP,
    "serving": HTTP | {"torch"},
    "api": {"torch"},
    "app": {"torch"},
    "models": {"torch"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for unit in RANKS for path in
            ([ROOT / f"{unit}.py"] if (ROOT / f"{unit}.py").is_file() else sorted((ROOT / unit).rglob("*.py")))}


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_names(path: Path, for_type_checkers: bool = True) -> set[str]:
    """Every module a file imports, at any depth of its code (`from a.b import c` counts a.b and a.b.c); without
    for_type_checkers, not those it imports only for type checkers (under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if for_type_checkers else {
        id(node) for block in ast.walk(tree) if is_type_checking(block) for node in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = project_modules()
IMPORTS = {name: imported_names(path) for name, path in MODULES.items()}
# what runs: an import only type checkers read cannot make a cycle (the ranks still count it)
RUNTIME_IMPORTS = {name: imported_names(path, for_type_checkers=False) for name, path in MODULES.items()}


def unit(name: str) -> str:
    return name.split(".")[0]


def test_every_top_level_package_and_module_has_a_rank():
    top_level = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert top_level - {"example_client"} - {"bench", "tests"} == set(RANKS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_flow_down(name):
    upward = sorted(i for i in IMPORTS[name] if unit(i) in RANKS and unit(i) != unit(name)
                    and RANKS[unit(i)] >= RANKS[unit(name)])
    assert not upward, f"{name} (rank {RANKS[unit(name)]}) imports {upward}, which do not lie below it"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_forbidden_imports(name):
    forbidden = FORBIDDEN.get(unit(name), set())
    crossing = sorted(i for i in IMPORTS[name] if unit(i) in forbidden)
    assert not crossing, f"{name} must not import {crossing}"


def test_no_import_cycles_inside_a_unit():
    graph = {name: {i for i in imports if i in MODULES and i != name} for name, imports in RUNTIME_IMPORTS.items()}
    for name in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer is inside them
        for target in list(graph[name]):
            parts = target.split(".")
            graph[name].update(p for p in (".".join(parts[:n]) for n in range(1, len(parts)))
                               if p in MODULES and not name.startswith(p + ".") and p != name)
    visiting, done = [], set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(node):] + [node])}"
        visiting.append(node)
        for target in sorted(graph[node]):
            visit(target)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_the_checks_see_a_crossing(tmp_path):
    """The rules catch what they are meant to: an engine module that reached for the HTTP layer."""
    offender = tmp_path / "offender.py"
    offender.write_text("def f():\n    from fastapi import Request\n    import serving.errors\n")
    names = imported_names(offender)
    assert {"fastapi", "serving.errors"} <= names
    assert {unit(i) for i in names} & FORBIDDEN["batching"] == {"fastapi"}
    assert RANKS[unit("serving.errors")] > RANKS["batching"]


def test_an_import_for_type_checkers_counts_for_the_ranks_but_not_for_cycles(tmp_path):
    module = tmp_path / "typed.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import serving.errors\n")
    assert "serving.errors" in imported_names(module)
    assert "serving.errors" not in imported_names(module, for_type_checkers=False)
