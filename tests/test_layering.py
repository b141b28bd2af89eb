"""Dependencies point one way: CLI → experiments → evaluation/bounds → editing → analysis → models/data →
prompts → factworld; plotting is a leaf; no library module imports the CLI."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keyscope"

#: Layer of every module of the package; a module may import modules of its own layer or below. A module that
#: exists but is not listed here (or in :data:`LEAVES`) fails :func:`test_every_module_is_listed`.
LAYERS = {
    "keyscope": 0, "keyscope._infra.errors": 0, "keyscope._infra.atomic": 0, "keyscope._infra.cache": 0, "keyscope._infra.distributed": 0,
    **dict.fromkeys(["keyscope.factworld", "keyscope.factworld.card", "keyscope.factworld.corpus",
                     "keyscope.factworld.export", "keyscope.factworld.quality", "keyscope.factworld.tokenizer",
                     "keyscope.factworld.train", "keyscope.factworld.world"], 1),
    "keyscope.data.prompts": 2, "keyscope.model.gguf": 2,
    "keyscope.model.capture": 3, "keyscope.model.models": 3, "keyscope._infra.memory": 3, "keyscope.analysis.keys": 3, "keyscope.data.corpus": 3, "keyscope.data.datasets": 3,
    "keyscope.analysis.predictions": 3, "keyscope.data.perturbations": 3,
    "keyscope.analysis.stats": 4, "keyscope.analysis.covariance": 4, "keyscope.analysis.covariance_job": 4, "keyscope.evaluation.metrics": 4, "keyscope.analysis.similarity": 4, "keyscope.analysis.scan": 4, "keyscope.analysis.trace": 4,
    "keyscope.editing.rome": 5, "keyscope.editing.rep": 5, "keyscope.editing.base": 5, "keyscope.editing.memit": 5,
    "keyscope.evaluation.evaluate": 6, "keyscope.evaluation.bounds": 6, "keyscope.editing.checks": 6, "keyscope.evaluation.ablation": 6, "keyscope.evaluation.reach": 6, "keyscope.evaluation.sequential": 6,
    **dict.fromkeys(["keyscope.studies", "keyscope.studies.ablation", "keyscope.studies.bounds",
                     "keyscope.studies.edit", "keyscope.studies.factworld", "keyscope.studies.readme",
                     "keyscope.studies.reproduce", "keyscope.studies.scan", "keyscope.studies.similarity",
                     "keyscope.studies.table1", "keyscope.studies.tables", "keyscope.studies.trace",
                     "keyscope.studies.values", "keyscope.studies.reach", "keyscope.studies.sequential"], 7),
    **dict.fromkeys(["keyscope.cli", "keyscope.cli.bounds", "keyscope.cli.common", "keyscope.cli.data",
                     "keyscope.cli.edit", "keyscope.cli.evaluate", "keyscope.cli.factworld", "keyscope.cli.output",
                     "keyscope.cli.reproduce", "keyscope.cli.scan", "keyscope.cli.similarity", "keyscope.cli.trace",
                     "keyscope.cli.values", "keyscope.cli.covariance", "keyscope.cli.reach", "keyscope.cli.sequential", "keyscope.__main__"], 8),
}

#: Plotting: a leaf that imports nothing of keyscope but itself (and that anything but the library's lower
#: layers may import).
LEAVES = ("keyscope.studies.plotting", "keyscope.studies.plotting.bounds", "keyscope.studies.plotting.fig3", "keyscope.studies.plotting.fig4",
          "keyscope.studies.plotting.fig5", "keyscope.studies.plotting.fig7", "keyscope.studies.plotting.trace",
          "keyscope.studies.plotting.reach", "keyscope.studies.plotting.sequential")


def package_modules(package_dir: Path, prefix: str = "keyscope.") -> set[str]:
    """Every module and subpackage under ``package_dir`` (found with :mod:`pkgutil`, nothing imported)."""
    found = {prefix.rstrip(".")}
    for info in pkgutil.iter_modules([str(package_dir)]):
        name = prefix + info.name
        found.add(name)
        if info.ispkg:
            found |= package_modules(package_dir / info.name, name + ".")
    return found


def unlisted(package_dir: Path) -> list[str]:
    """Modules of the package at ``package_dir`` that neither :data:`LAYERS` nor :data:`LEAVES` lists."""
    return sorted(package_modules(package_dir) - set(LAYERS) - set(LEAVES))

#: Modules that are the command line's entry points (``python -m keyscope``), not library modules.
ENTRY_POINTS = {"keyscope.__main__"}


def layer_of(name: str) -> int | None:
    """The layer of ``name`` — a module, or a name imported from one (``keyscope.data.perturbations.KINDS``): that of
    its longest listed prefix (``keyscope`` itself only for the package)."""
    best = None
    for prefix, layer in LAYERS.items():
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


def test_every_module_is_listed():
    assert not unlisted(PACKAGE), f"modules missing from LAYERS (or LEAVES): {unlisted(PACKAGE)}"
    stale = sorted((set(LAYERS) | set(LEAVES)) - package_modules(PACKAGE))
    assert not stale, f"LAYERS/LEAVES list modules that do not exist: {stale}"


def test_an_unlisted_module_fails_the_check(tmp_path):
    fake = tmp_path / "keyscope"
    for name in [*LAYERS, *LEAVES]:
        parts = name.split(".")[1:]
        if (PACKAGE.joinpath(*parts) / "__init__.py").exists():
            (fake.joinpath(*parts)).mkdir(parents=True, exist_ok=True)
            (fake.joinpath(*parts) / "__init__.py").write_text("")
        elif parts:
            (fake.joinpath(*parts[:-1])).mkdir(parents=True, exist_ok=True)
            fake.joinpath(*parts[:-1], parts[-1] + ".py").write_text("")
    (fake / "__init__.py").write_text("")
    assert unlisted(fake) == []
    (fake / "newthing.py").write_text("")
    (fake / "experiments" / "newstudy.py").write_text("")
    assert unlisted(fake) == ["keyscope.studies.newstudy", "keyscope.newthing"]
    assert layer_of("keyscope.newthing") is None and layer_of("keyscope.analysis.covariance") == 4
    assert layer_of("keyscope.studies.trace") == 7 and layer_of("keyscope") == 0
    assert layer_of("keyscope.data.perturbations.KINDS") == 3


def test_dependencies_point_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        own = layer_of(name)
        for target in imports(path):
            if name in LEAVES:
                if not target.startswith("keyscope.studies.plotting"):
                    violations.append(f"{name} (plotting is a leaf) imports {target}")
                continue
            if target.startswith("keyscope.cli") and not name.startswith("keyscope.cli") and name not in ENTRY_POINTS:
                violations.append(f"{name} imports the CLI ({target})")
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                violations.append(f"{name} (layer {own}) imports {target} (layer {theirs})")
    assert not violations, "\n".join(sorted(violations))


def test_data_modules_run_no_model():
    """Prompts, fact files and corpora are read without model code: the token and prompt helpers import nothing
    of keyscope but its errors, and ``datasets`` needs no key capture, predictions or models to fill a prompt."""
    assert {t for t in imports(PACKAGE / "prompts.py")} <= {"keyscope._infra.errors", "keyscope._infra.errors.SubjectNotFound"}
    model_code = ("keyscope.analysis.keys", "keyscope.analysis.predictions", "keyscope.model.models", "keyscope.editing.rome")
    assert [t for t in imports(PACKAGE / "datasets.py") if t.startswith(model_code)] == []
    # corpus.default_corpus reads a model's name and card (keyscope.model.models), nothing that runs it
    assert [t for t in imports(PACKAGE / "corpus.py") if t.startswith(model_code)
            and t not in ("keyscope.model.models", "keyscope.model.models.model_card", "keyscope.model.models.model_name")] == []
