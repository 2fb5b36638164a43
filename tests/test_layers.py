"""The package's import graph: no cycles, and every import goes to the same layer or a lower one.

The layer order lives here, in one place (WORKSPACE.md shows it). Imports are read with ``ast`` from the source,
function-level imports included, so the test needs nothing installed beyond the standard library.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qzoom_jax"

# Top to bottom: a module may import from its own layer and the layers below it, never from one above.
LAYERS = (
    ("entry points", ("qzoom_jax", "qzoom_jax.train", "qzoom_jax.labels", "qzoom_jax.infer", "qzoom_jax.evaluate",
                      "qzoom_jax.convert", "qzoom_jax.bench", "qzoom_jax.pipeline", "qzoom_jax.assets")),
    ("stages and engines", ("qzoom_jax.training", "qzoom_jax.labelling", "qzoom_jax.evaluation", "qzoom_jax.zoom")),
    ("checkpoint formats", ("qzoom_jax.checkpoints",)),
    ("data", ("qzoom_jax.data",)),
    ("models", ("qzoom_jax.models",)),
    ("runtime", ("qzoom_jax.runtime",)),
)
# The model layer names its parameters and computes; reading and writing files of any format is elsewhere.
FORBIDDEN = {"qzoom_jax.models": ("safetensors", "orbax", "tensorflow_datasets", "grain", "etils")}
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module ``name`` imports (qzoom_jax modules resolved to the module, others by top-level name)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in MODULES else module)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefix == "qzoom_jax"  # the package's __init__ is the public API, an entry point
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if len(prefix) > best:
                    best, index = len(prefix), i
    if index is None:
        raise AssertionError(f"module {module} is in no layer; add it to LAYERS in {__file__}")
    return index


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def upward_imports(graph) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                  for m, deps in graph.items() for d in deps
                  if d.startswith("qzoom_jax") and layer_of(d) < layer_of(m))


def find_cycles(graph) -> list[str]:
    internal = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(internal[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(internal):
        if m not in state:
            visit(m)
    return cycles


def test_imports_only_go_down():
    bad = upward_imports(GRAPH)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    fake = {"qzoom_jax.models.vlm": {"qzoom_jax.zoom.engine"}, "qzoom_jax.zoom.engine": {"qzoom_jax.models.vlm"},
            "qzoom_jax.data.stage1": {"numpy"}}
    assert upward_imports(fake) == ["qzoom_jax.models.vlm (models) imports qzoom_jax.zoom.engine "
                                    "(stages and engines)"]
    assert find_cycles(fake) == ["qzoom_jax.models.vlm -> qzoom_jax.zoom.engine -> qzoom_jax.models.vlm"]
    # `from package import submodule` counts as importing the submodule
    assert "qzoom_jax.models.qzoom.roi" in GRAPH["qzoom_jax.data.stage1"]


@pytest.mark.parametrize("prefix", sorted(FORBIDDEN))
def test_models_import_no_file_format(prefix):
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")
           for d in deps if d.split(".")[0] in FORBIDDEN[prefix]]
    assert not bad, "\n".join(bad)


def test_modules_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"
