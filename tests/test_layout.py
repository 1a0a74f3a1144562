"""The package's layout: no import cycle, the backend asked in one place, small modules, one backend interface.

These read the source with `ast` (imports inside functions included), so they run without importing the
package's modules and on every backend.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.all_backends

PACKAGE = Path(__file__).resolve().parents[1] / "keras_noisygd"
MAX_LINES = 300
# The only modules besides `_backend/` that may read `keras.backend.backend()`: none today.
BACKEND_QUERY_ALLOWED = set()


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name):
    return MODULES[name].name == "__init__.py"


def imported_modules(name, source=None):
    """The package's modules that `name` imports, anywhere in its code (`from x import y` counts `x.y` if it
    is a module, else `x`); `source` stands in for the module's own text."""
    tree = ast.parse(MODULES[name].read_text() if source is None else source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name if is_package(name) else name.rsplit(".", 1)[0]
                base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), and modules that import themselves."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_the_package_has_no_import_cycle():
    assert cycles(GRAPH) == []


def test_the_cycle_check_finds_a_cycle():
    # The check itself: a graph with a cycle through three modules (and one outside it).
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_import_walk_sees_imports_inside_functions_and_relative_ones():
    source = (
        "import keras\n"
        "def f():\n    from keras_noisygd.per_example import layer_rows\n"
        "class C:\n    def g(self):\n        from .. import _backend\n        from . import result, losses\n"
    )
    found = imported_modules("keras_noisygd.per_example.compute", source)
    assert found == {
        "keras_noisygd.per_example.layer_rows", "keras_noisygd._backend",
        "keras_noisygd.per_example.result", "keras_noisygd.per_example.losses",
    }


def backend_queries(name):
    tree = ast.parse(MODULES[name].read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backend"
        and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "backend"
    ]


def test_only_the_backend_package_asks_which_backend_runs():
    asking = {
        name: lines for name in MODULES if (lines := backend_queries(name))
        and not name.startswith("keras_noisygd._backend") and name not in BACKEND_QUERY_ALLOWED
    }
    assert asking == {}
    assert backend_queries("keras_noisygd._backend")  # the check sees a real call


def top_level_names(path):
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_each_backend_module_defines_the_whole_interface(backend):
    init = ast.parse((PACKAGE / "_backend" / "__init__.py").read_text())
    interface = next(
        ast.literal_eval(node.value) for node in init.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INTERFACE" for t in node.targets)
    )
    assert set(interface) - top_level_names(PACKAGE / "_backend" / f"{backend}.py") == set()
    # ... and the package re-exports every one of them.
    assert set(interface) - top_level_names(PACKAGE / "_backend" / "__init__.py") == set()


def test_modules_are_small_or_say_why_not():
    long = {}
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and f"Longer than {MAX_LINES} lines because" not in docstring:
            long[name] = lines
    assert long == {}
