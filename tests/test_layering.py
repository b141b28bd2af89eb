"""The packages are the layers, and dependencies point one way: CLI → studies → evaluation → editing → analysis →
data → model → factworld → infrastructure; plotting (inside studies) is a leaf; no library module imports the
CLI; and no module imports itself through others (no import cycle, counting imports inside functions)."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keyscope"

#: The layer of each package of keyscope; a module may import modules of its own layer or below. Every module
#: of keyscope lives in one of them (a module outside them fails :func:`test_every_module_is_in_a_layer`).
#: ``model`` sits below ``data`` because ``corpus.default_corpus`` reads a model's name and card
#: (:func:`test_data_modules_run_no_model` keeps the rest of data free of model code).
LAYERS = {
    "keyscope": 0,  # the package itself: its public names are imported lazily (PEP 562), only errors eagerly
    "keyscope._infra": 0, "keyscope.factworld": 1, "keyscope.model": 2, "keyscope.data": 3,
    "keyscope.analysis": 4, "keyscope.editing": 5, "keyscope.evaluation": 6, "keyscope.studies": 7,
    "keyscope.cli": 8, "keyscope.__main__": 8,
}

#: Plotting: a leaf that imports nothing of keyscope but itself (and that anything but the library's lower
#: layers may import).
LEAF = "keyscope.studies.plotting"

#: Modules that are the command line's entry points (``python -m keyscope``), not library modules.
ENTRY_POINTS = {"keyscope.__main__"}


def package_modules(package_dir: Path, prefix: str = "keyscope.") -> set[str]:
    """Every module and subpackage under ``package_dir`` (found with :mod:`pkgutil`, nothing imported)."""
    found = {prefix.rstrip(".")}
    for info in pkgutil.iter_modules([str(package_dir)]):
        name = prefix + info.name
        found.add(name)
        if info.ispkg:
            found |= package_modules(package_dir / info.name, name + ".")
    return found


def layer_of(name: str) -> int | None:
    """The layer of ``name`` — a module, or a name imported from one (``keyscope.data.perturbations.KINDS``):
    that of its longest listed prefix (``keyscope`` itself only for the package)."""
    best = None
    for prefix, layer in LAYERS.items():
        if name == prefix or (prefix != "keyscope" and name.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def unlisted(package_dir: Path) -> list[str]:
    """Modules of the package at ``package_dir`` that are in no layer of :data:`LAYERS`."""
    return sorted(name for name in package_modules(package_dir) if layer_of(name) is None)


def imports(path: Path) -> set[str]:
    """Every keyscope name ``path`` imports, at module level or in a function: ``keyscope.X`` and, for
    ``from keyscope.X import a``, also ``keyscope.X.a``; ``importlib.import_module("keyscope.X")`` too."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keyscope"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("keyscope"))
        elif imported_by_name(node):
            found.add(imported_by_name(node))
    return found


def imported_by_name(node: ast.AST) -> str | None:
    """``keyscope.X`` for a call ``importlib.import_module("keyscope.X")`` (a literal name), else ``None``."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith("keyscope")):
        return node.args[0].value
    return None


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module → the keyscope modules it imports: every import statement, also inside functions, and
    ``importlib.import_module`` of a literal name. ``from keyscope.X import a`` imports the module
    ``keyscope.X.a`` when that is one, else ``keyscope.X``; the implicit import of a module's parent packages is
    not an edge."""
    paths = {module_name(path, package_dir): path for path in package_dir.rglob("*.py")}

    def module_of(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keyscope"):
                targets.update(module_of(f"{node.module}.{a.name}") for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(module_of(a.name) for a in node.names if a.name.startswith("keyscope"))
            elif imported_by_name(node):
                targets.add(module_of(imported_by_name(node)))
        graph[name] = targets - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_every_module_is_in_a_layer():
    assert not unlisted(PACKAGE), f"modules in no layer package of LAYERS: {unlisted(PACKAGE)}"
    stale = sorted(set(LAYERS) - package_modules(PACKAGE))
    assert not stale, f"LAYERS lists modules that do not exist: {stale}"
    assert layer_of(LEAF) is not None


def test_a_module_outside_the_layers_fails_the_check(tmp_path):
    fake = tmp_path / "keyscope"
    for name in LAYERS:
        parts = name.split(".")[1:]
        if (PACKAGE.joinpath(*parts) / "__init__.py").exists():
            (fake.joinpath(*parts)).mkdir(parents=True, exist_ok=True)
            (fake.joinpath(*parts) / "__init__.py").write_text("")
        elif parts:
            (fake.joinpath(*parts[:-1])).mkdir(parents=True, exist_ok=True)
            fake.joinpath(*parts[:-1], parts[-1] + ".py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "studies" / "newstudy.py").write_text("")  # inside a layer: fine
    assert unlisted(fake) == []
    (fake / "newthing.py").write_text("")
    (fake / "newlayer").mkdir()
    (fake / "newlayer" / "__init__.py").write_text("")
    assert unlisted(fake) == ["keyscope.newlayer", "keyscope.newthing"]
    assert layer_of("keyscope.newthing") is None and layer_of("keyscope.analysis.covariance") == 4
    assert layer_of("keyscope.studies.trace") == 7 and layer_of("keyscope") == 0
    assert layer_of("keyscope.data.perturbations.KINDS") == 3 and layer_of("keyscope.cli.scan") == 8


def test_dependencies_point_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        own = layer_of(name)
        for target in imports(path):
            if name == LEAF or name.startswith(LEAF + "."):
                if not target.startswith(LEAF):
                    violations.append(f"{name} (plotting is a leaf) imports {target}")
                continue
            if target.startswith("keyscope.cli") and not name.startswith("keyscope.cli") and name not in ENTRY_POINTS:
                violations.append(f"{name} imports the CLI ({target})")
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                violations.append(f"{name} (layer {own}) imports {target} (layer {theirs})")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycles():
    """No module imports itself through others, counting every import statement (also inside functions: a
    function-level import is a cycle that only waits for its first call)."""
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(" ↔ ".join(component) for component in found)


def test_the_cycle_check_finds_a_cycle_through_a_function(tmp_path):
    fake = tmp_path / "keyscope"
    (fake / "editing").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "editing" / "__init__.py").write_text("")
    (fake / "editing" / "base.py").write_text("def prepare():\n    from keyscope.editing import rome\n")
    (fake / "editing" / "rome.py").write_text("from keyscope.editing.base import prepare\n")
    (fake / "editing" / "memit.py").write_text("import importlib\nimportlib.import_module('keyscope.editing.rome')\n")
    graph = import_graph(fake)
    assert graph["keyscope.editing.memit"] == {"keyscope.editing.rome"}
    assert cycles(graph) == [["keyscope.editing.base", "keyscope.editing.rome"]]
    (fake / "editing" / "base.py").write_text("def prepare():\n    pass\n")
    assert cycles(import_graph(fake)) == []


def test_data_modules_run_no_model():
    """Prompts, fact files and corpora are read without model code: the token and prompt helpers import nothing
    of keyscope but its errors, ``datasets`` needs no key capture, predictions or models to fill a prompt, and
    of the data package only ``corpus.default_corpus`` reads a model's name and card, nothing that runs it."""
    data = PACKAGE / "data"
    assert imports(data / "prompts.py") <= {"keyscope._infra.errors", "keyscope._infra.errors.SubjectNotFound"}
    model_code = ("keyscope.model", "keyscope.analysis", "keyscope.editing")
    assert [t for t in imports(data / "datasets.py") if t.startswith(model_code)] == []
    reads_a_card = {"keyscope.model.models", "keyscope.model.models.model_card", "keyscope.model.models.model_name"}
    for path in data.glob("*.py"):
        allowed = reads_a_card if path.name == "corpus.py" else set()
        assert {t for t in imports(path) if t.startswith(model_code)} <= allowed, path.name
