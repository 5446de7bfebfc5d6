"""Imports point down only: a static read of every import in src/ (inside functions too) finds no cycle
between packages, and each package imports only the layers below it (DESIGN.md's layout)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sftbridge"

# Each top-level package or module of sftbridge, and what it may import. Leaves (errors, hf_names, ...)
# import nothing of ours but errors.
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "environment": set(),
    "hf_names": {"errors"},
    "archive": {"errors"},
    "output": {"environment"},
    "jumpstart": {"errors"},
    "config": {"errors", "hf_names"},
    "runs": {"errors", "config"},
    "resume": {"errors", "config", "runs"},
    "aws": {"errors"},
    "data": {"errors", "config", "runs"},
    "models": {"errors", "config", "runs", "environment"},
    "inference": {"errors", "config", "runs", "data", "models"},
    "report": {"errors", "config", "runs", "data", "inference"},
    "planning": {"errors", "config", "runs", "data", "models"},
    "training": {
        *("errors", "config", "runs", "data", "models", "inference", "report", "aws", "output"),
        "environment",
    },
    "backends": {
        *("errors", "config", "runs", "resume", "data", "models", "planning", "training", "aws", "archive"),
        *("environment", "inference"),
    },
    "serving": {"errors", "config", "runs", "data", "models", "inference", "planning", "aws", "archive"},
}


def imports_by_package() -> dict[str, dict[str, str]]:
    """package -> {imported package: the first module that imports it}."""
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for file in SRC.rglob("*.py"):
        parts = file.relative_to(SRC).with_suffix("").parts
        package = parts[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                pieces = name.split(".")
                if pieces[0] != "sftbridge" or len(pieces) < 2 or pieces[1] == package:
                    continue
                if (SRC / pieces[1]).is_dir() or (SRC / f"{pieces[1]}.py").is_file():
                    found[package].setdefault(pieces[1], "/".join(parts))
    return found


def test_every_package_imports_only_the_layers_below_it() -> None:
    found = imports_by_package()
    wrong = [
        f"{package} imports {target} ({where}.py)"
        for package, targets in sorted(found.items())
        if package in LAYERS
        for target, where in sorted(targets.items())
        if target not in LAYERS[package]
    ]
    assert wrong == []
    assert set(found) - {"cli", "__init__", "__main__"} <= set(LAYERS), "a new package: give it a layer"


def test_no_import_cycle_between_packages() -> None:
    graph = {package: set(targets) for package, targets in imports_by_package().items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    assert [package for package in sorted(graph) if reaches(package, package, set())] == []
