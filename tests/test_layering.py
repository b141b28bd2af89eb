"""Dependencies point one way: CLI → experiments → evaluation/bounds → editing → analysis → models/data →
factworld; plotting is a leaf; no library module imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keyscope"

#: Layer of each module (by dotted name prefix); a module may import modules of its own layer or below.
LAYERS = [
    ("keyscope", 0), ("keyscope.errors", 0), ("keyscope.cache", 0), ("keyscope.factworld", 1),
    ("keyscope.models", 2), ("keyscope.keys", 2), ("keyscope.corpus", 2), ("keyscope.datasets", 2),
    ("keyscope.predictions", 2), ("keyscope.perturbations", 2),
    ("keyscope.covariance", 3), ("keyscope.similarity", 3), ("keyscope.scan", 3), ("keyscope.trace", 3),
    ("keyscope.editing", 4), ("keyscope.rome", 4), ("keyscope.rep", 4), ("keyscope.memit", 4),
    ("keyscope.evaluate", 5), ("keyscope.bounds", 5), ("keyscope.ablation", 5), ("keyscope.sequential", 5),
    ("keyscope.experiments", 6), ("keyscope.cli", 7),
]


def layer_of(name: str) -> int | None:
    """The layer of module ``name``: its longest listed prefix's (``keyscope`` itself only for the package)."""
    best = None
    for prefix, layer in LAYERS:
        if name == prefix or (prefix != "keyscope" and name.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keyscope"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("keyscope"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_has_a_layer():
    unlisted = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                      if layer_of(module_name(p)) is None and not module_name(p).startswith("keyscope.plotting"))
    assert not unlisted, f"modules missing from LAYERS: {unlisted}"


def test_an_unlisted_module_would_fail_the_check():
    assert layer_of("keyscope.newthing") is None and layer_of("keyscope.covariance") == 3
    assert layer_of("keyscope.experiments.trace") == 6 and layer_of("keyscope") == 0


def test_dependencies_point_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        own = layer_of(name)
        for target in imports(path):
            if name.startswith("keyscope.plotting"):
                if not target.startswith("keyscope.plotting"):
                    violations.append(f"{name} (plotting is a leaf) imports {target}")
                continue
            if target.startswith("keyscope.cli") and not name.startswith("keyscope.cli"):
                violations.append(f"{name} imports the CLI ({target})")
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                violations.append(f"{name} (layer {own}) imports {target} (layer {theirs})")
    assert not violations, "\n".join(sorted(violations))
