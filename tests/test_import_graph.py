"""The package's imports flow one way: no circle, and no module imports from a layer above it.

The layers, lowest first (a module may import from its own layer and the ones below):

0. ``base``: the top-level helpers with no package imports of their own: ``errors.py``,
   ``logs.py``, ``paths.py``, ``progress.py``, ``workdir.py``. Every layer uses them, so they
   sit under all. Also ``train/config_base.py``, the one declaration of every option with its
   comment: it imports only ml_collections, and the layers below the trainer read their
   defaults from it (``EncoderOptions``' fields, the optimizer's keywords) instead of
   repeating them (tests/test_declared_once.py). Importing it runs
   ``jfe_jax/train/__init__.py``, which therefore imports nothing.
1. ``models``: ``jfe_jax/models/`` (architectures, params, batches; no host pipeline).
2. ``data``: ``jfe_jax/data/`` (items, images, tokens -> batches).
3. ``train``: ``jfe_jax/train/``.
4. ``index``: ``jfe_jax/index/`` (embedding items, exports, exact and ScaNN search).
5. ``eval``: ``jfe_jax/eval/``.
6. ``top``: every other top-level module (``encoder.py``, ``demo.py``, ``study.py``, a new
   one) and the package's ``__init__.py``: the user-facing classes and workflows.
7. ``cli``: ``cli.py`` and ``jfe_jax/commands/`` (the subcommands' argument parsing).

An import counts wherever it is written: at module level or inside a function. Imports under
``if TYPE_CHECKING:`` do not: they never run, so they make neither an arrow nor a circle
(``index/embedder.py`` names ``Encoder`` in its hints that way). Module names given to
``importlib.import_module`` (or ``cli._lazy``) as a string constant count as imports.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "jfe_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS = ("base", "models", "data", "train", "index", "eval", "top", "cli")
BASE_MODULES = ("errors", "image_files", "logs", "paths", "progress", "workdir")
BASE_SUBMODULES = ("train.config_base",)  # base modules inside a subpackage (docstring)
SUBPACKAGE_LAYERS = {"models": "models", "data": "data", "train": "train", "index": "index"}
SUBPACKAGE_LAYERS |= {"eval": "eval", "commands": "cli"}
STRING_IMPORTERS = ("import_module", "_lazy")  # calls whose first argument names a module


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` as its
    package's name)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> str:
    """The layer of a dotted module name (see the module docstring)."""
    parts = module.split(".")[1:]
    if not parts:
        return "top"  # jfe_jax/__init__.py
    if ".".join(parts) in BASE_SUBMODULES:
        return "base"
    if parts[0] in SUBPACKAGE_LAYERS and (len(parts) > 1 or (ROOT / parts[0]).is_dir()):
        return SUBPACKAGE_LAYERS[parts[0]]
    if parts[0] in BASE_MODULES:
        return "base"
    return "cli" if parts[0] == "cli" else "top"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(node: ast.AST):
    """``ast.walk`` that skips the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(
    module: str, source: str, modules: set[str], *, is_package: bool = False
) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of ``source`` that resolves to one of
    ``modules``: absolute and relative, at module level and inside functions and classes.

    ``from pkg import name`` imports the submodule ``pkg.name`` when there is one, else
    ``pkg`` itself; a name that is not a module resolves to the longest module prefix."""
    package = module if is_package else module.rpartition(".")[0]

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for node in _walk_runtime(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [
                f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                for a in node.names
            ]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in STRING_IMPORTERS and isinstance(first, ast.Constant):
                names = [first.value] if isinstance(first.value, str) else []
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                resolved = resolve(name)
                if resolved is not None and resolved != module:
                    found.append((resolved, node.lineno))
    return sorted(dict.fromkeys(found), key=lambda edge: edge[1])


@functools.cache
def import_graph() -> dict[str, list[tuple[str, str]]]:
    """Module -> [(imported module, "file:line")], over the whole package."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT.parent)
        graph[module] = [
            (target, f"{where}:{line}")
            for target, line in imports_of(
                module, source, set(files), is_package=path.name == "__init__.py"
            )
        ]
    return graph


def upward_imports(graph: dict[str, list[tuple[str, str]]]) -> list[str]:
    """One line per import from a higher layer, naming file:line and both layers."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [
        f"{where}: {module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, edges in sorted(graph.items())
        for target, where in edges
        if rank[layer_of(target)] > rank[layer_of(module)]
    ]


def import_cycles(graph: dict[str, list[tuple[str, str]]]) -> list[str]:
    """One line per circle (a strongly connected component, Tarjan's algorithm without
    recursion), as its modules with the file:line of each import that closes a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target, _ in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(graph.get(target, []))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
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
                        components.append(set(component))
    return [
        " <-> ".join(sorted(c))
        + ": "
        + ", ".join(
            f"{where} ({module} -> {target})"
            for module in sorted(c)
            for target, where in graph[module]
            if target in c
        )
        for c in components
    ]


def test_no_module_imports_from_a_higher_layer():
    upward = upward_imports(import_graph())
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_base_helpers_listed_exist():
    # A new top-level module lands in "top" unless it is listed as a base helper; a listed
    # helper that no longer exists means the list went stale.
    top_level = {p.stem for p in ROOT.glob("*.py")}
    assert set(BASE_MODULES) <= top_level, set(BASE_MODULES) - top_level


def test_the_base_submodules_exist_and_their_packages_import_nothing():
    # Importing jfe_jax.train.config_base runs jfe_jax/train/__init__.py: an import there
    # would reach the train layer from below without an arrow in the graph.
    files = module_files()
    for name in BASE_SUBMODULES:
        module = f"{PACKAGE}.{name}"
        assert module in files, f"{module} is listed as a base module but does not exist"
        assert layer_of(module) == "base"
        package = files[module].parent / "__init__.py"
        tree = ast.parse(package.read_text(encoding="utf-8"))
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"{package} imports something: it must stay import-free"


def test_the_parser_sees_relative_in_function_and_string_imports():
    modules = {"jfe_jax", "jfe_jax.models", "jfe_jax.models.axes", "jfe_jax.data"}
    modules |= {"jfe_jax.data.mbeir", "jfe_jax.eval", "jfe_jax.eval.recall", "jfe_jax.cli"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..eval import recall\n"  # relative, a submodule by name
        "from .mbeir import MBEIR\n"  # relative, a name in a module
        "if TYPE_CHECKING:\n"
        "    from jfe_jax.cli import main\n"  # type-only: not an import
        "def f():\n"
        "    import jfe_jax.models.axes as axes\n"  # inside a function
        "    return importlib.import_module('jfe_jax.eval.recall')\n"
    )
    found = imports_of("jfe_jax.data.pool", source, modules)
    assert found == [
        ("jfe_jax.eval.recall", 2),
        ("jfe_jax.data.mbeir", 3),
        ("jfe_jax.models.axes", 7),
        ("jfe_jax.eval.recall", 8),
    ]
    graph = {"jfe_jax.data.pool": [(t, f"data/pool.py:{n}") for t, n in found]}
    graph |= {m: [] for m in modules}
    assert upward_imports(graph) == [
        "data/pool.py:2: jfe_jax.data.pool (data) imports jfe_jax.eval.recall (eval)",
        "data/pool.py:8: jfe_jax.data.pool (data) imports jfe_jax.eval.recall (eval)",
    ]


def test_a_circle_is_named_with_its_imports():
    graph = {
        "jfe_jax.a": [("jfe_jax.b", "a.py:3")],
        "jfe_jax.b": [("jfe_jax.c", "b.py:5")],
        "jfe_jax.c": [("jfe_jax.a", "c.py:7")],
        "jfe_jax.d": [("jfe_jax.a", "d.py:1")],
    }
    assert import_cycles(graph) == [
        "jfe_jax.a <-> jfe_jax.b <-> jfe_jax.c: a.py:3 (jfe_jax.a -> jfe_jax.b), "
        "b.py:5 (jfe_jax.b -> jfe_jax.c), c.py:7 (jfe_jax.c -> jfe_jax.a)"
    ]
