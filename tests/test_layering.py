"""Dependency direction: every import between our packages points down, lazy (function-level) imports included.

runtime is the ground floor (nothing of ours; it must stay torch-free and installable alone); calibration and train
build on runtime; export on runtime, calibration and train (it loads train's checkpoints and model definitions and
refits confidence with train's code); benchmarks may use everything. ``sem_extras`` (the CLI's missing-extra
helper) is a leaf every package except runtime may use. Imports by name (``importlib.import_module("x")``,
``sem_extras.import_for_help("x")``) count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "calibration", "train", "export", "benchmarks")
LEAF_MODULES = ("sem_extras",)  # top-level single-file modules
OURS = PACKAGES + LEAF_MODULES

#: package → the packages of ours it may import (the allowed arrows; nothing else, and never upward).
ALLOWED: dict[str, frozenset[str]] = {
    "sem_extras": frozenset(),
    "runtime": frozenset(),
    "calibration": frozenset({"runtime", "sem_extras"}),
    "train": frozenset({"runtime", "sem_extras"}),
    "export": frozenset({"runtime", "calibration", "train", "sem_extras"}),
    "benchmarks": frozenset({"runtime", "calibration", "train", "export", "sem_extras"}),
}
#: Calls that import the module named by their first (string) argument.
IMPORT_BY_NAME = {"import_module", "__import__", "import_for_help"}


def _module_files(root: Path) -> Iterator[tuple[str, Path]]:
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            yield pkg, f
    for mod in LEAF_MODULES:
        if (root / f"{mod}.py").is_file():
            yield mod, root / f"{mod}.py"


def _imported_names(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``, at any depth (functions, TYPE_CHECKING, ...)."""
    here = list(path.relative_to(root).with_suffix("").parts)
    package = here[:-1]  # the package a relative import starts from (the module's own for __init__ too)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.lineno, str(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in IMPORT_BY_NAME:
                yield node.lineno, node.args[0].value


def import_graph(root: Path = REPO) -> dict[str, dict[str, list[str]]]:
    """package → {imported package of ours → ["file:line imports name", ...]}."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in OURS}
    for pkg, path in _module_files(root):
        for line, name in _imported_names(path, root):
            top = name.partition(".")[0]
            if top in OURS and top != pkg:
                graph[pkg].setdefault(top, []).append(f"{path.relative_to(root)}:{line} imports {name}")
    return graph


def violations(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    return [f"{site} ({pkg} -> {dep} is not allowed; {pkg} may import: {', '.join(sorted(ALLOWED[pkg])) or 'nothing'})"
            for pkg, deps in graph.items() for dep, sites in sorted(deps.items()) if dep not in ALLOWED[pkg]
            for site in sites]


def render(graph: dict[str, dict[str, list[str]]]) -> str:
    return "\n".join(f"{pkg} -> {', '.join(sorted(graph[pkg])) or '(nothing of ours)'}" for pkg in OURS)


def test_imports_between_our_packages_point_down():
    graph = import_graph()
    print(render(graph))
    bad = violations(graph)
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_the_scan_sees_top_level_lazy_relative_and_by_name_imports(tmp_path):
    """The checker itself: each kind of upward import in a made-up tree is reported with its file and line."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "sem_extras.py").write_text("")
    (tmp_path / "runtime" / "a.py").write_text("import numpy\nfrom runtime import b\n\n\ndef f():\n"
                                               "    from export.onnx_export import export_onnx\n")
    (tmp_path / "runtime" / "b.py").write_text("import importlib\nimportlib.import_module('train.models')\n")
    (tmp_path / "calibration" / "c.py").write_text("from ..export import golden\nfrom .d import x\n")
    (tmp_path / "train" / "t.py").write_text("from sem_extras import cli\nimport runtime.scores\n")
    bad = violations(import_graph(tmp_path))
    assert [b.split(" (")[0] for b in bad] == ["runtime/a.py:6 imports export.onnx_export",
                                               "runtime/b.py:2 imports train.models",
                                               "calibration/c.py:1 imports export"]
    assert "(calibration -> export is not allowed; calibration may import: runtime, sem_extras)" in bad[2]


@pytest.mark.parametrize("pkg, dep", [("calibration", "runtime"), ("export", "calibration"), ("train", "runtime"),
                                      ("benchmarks", "export")])
def test_known_downward_edges_are_found(pkg, dep):
    # Guards against a scan that finds nothing (and so passes on anything).
    assert dep in import_graph()[pkg]
