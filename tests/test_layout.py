"""The package's shape: layers that import one way, no import circles, and sizes a reader can hold.

Layers, bottom to top (a module imports only from lower layers and from its own subpackage):

    runtime  <-  data  <-  the method (losses, mi, negatives)  <-  model  <-  training
             <-  metrics  <-  reporting  <-  stages  <-  the entry points

``mipo.kernels`` (the top-level ``kernels/`` folder) stands apart: it imports nothing of mipo. The
kernels, ``runtime`` and ``data`` are one layer each; so is the method (``losses``, ``mi``, ``negatives``).
Every import counts, at module level or inside a function, under ``TYPE_CHECKING`` or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

ORDER = ("kernels", "runtime", "data", "method", "model", "training", "metrics", "reporting", "stages")
PREFIXES = {"mipo.kernels": "kernels", "mipo.runtime": "runtime", "mipo.data": "data", "mipo.losses": "method",
            "mipo.mi": "method", "mipo.negatives": "method", "mipo.model": "model", "mipo.training": "training",
            "mipo.metrics": "metrics", "mipo.reporting": "reporting", "mipo.stages": "stages"}
LAYERS = {layer: height for height, layer in enumerate(ORDER)}
ENTRY_POINTS = ("train.py", "sample.py", "evaluate.py", "pipeline.py", "aggregate.py")
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS, MAX_ENTRY_LINES = 500, 80, 7, 60
# Kernels keep the signatures their callers fix: transformers calls an attention function with these arguments.
KERNEL_SIGNATURES = {"mipo/model/segment_attention.py:segment_attention"}


def package_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of mipo, kernels included (reached through the mipo/kernels link)."""
    modules = {f"mipo.kernels.{path.stem}": path for path in sorted((ROOT / "kernels").glob("*.py"))}
    for path in sorted((ROOT / "mipo").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts != ["mipo"] and parts[:2] != ["mipo", "kernels"]:  # the root's face; the kernels from kernels/
            modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> str:
    for prefix, layer in PREFIXES.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to PREFIXES in tests/test_layout.py")


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The mipo modules ``path`` imports (``from mipo.x import y`` counts as mipo.x.y when that is a module)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_imports_run_one_way(graph):
    """A module imports from a lower layer or from its own layer, never from a higher or a sibling one."""
    upward = []
    for module, imported in graph.items():
        for target in imported:
            source_layer, target_layer = layer_of(module), layer_of(target)
            if source_layer != target_layer and LAYERS[target_layer] > LAYERS[source_layer]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_circles(graph):
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _parameters(node: ast.FunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [name for name in names if name not in ("self", "cls")]


def checked_sources() -> list[Path]:
    """Everything outside the kernels that the limits apply to: the package and the entry points."""
    sources = [path for name, path in package_modules().items() if not name.startswith("mipo.kernels")]
    return sources + [ROOT / name for name in ENTRY_POINTS]


def test_modules_are_at_most_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in package_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_functions_are_at_most_80_lines_and_take_at_most_7_parameters():
    long, wide = [], []
    for path in checked_sources():
        for node in _functions(path):
            where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
            if (lines := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                long.append(f"{where}: {lines} lines")
            if len(parameters := _parameters(node)) > MAX_PARAMETERS and \
                    f"{path.relative_to(ROOT)}:{node.name}" not in KERNEL_SIGNATURES:
                wide.append(f"{where}: {len(parameters)} parameters")
    assert long == [] and wide == []


def test_entry_points_are_thin():
    assert {name: n for name in ENTRY_POINTS if (n := len((ROOT / name).read_text().splitlines())) > MAX_ENTRY_LINES} == {}


def test_the_papers_equations_import_from_where_readers_look():
    from mipo.losses import dpo_loss
    from mipo.mi import estimate_pmi, pointwise_mi

    assert callable(dpo_loss) and callable(pointwise_mi) and callable(estimate_pmi)


def test_the_layer_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a data module importing the training layer is reported."""
    fake = tmp_path / "pairs.py"
    fake.write_text("from mipo.training.forward import TrainingForward\nimport mipo.runtime.files\n")
    found = imports_of(fake, "mipo.data.pairs", {"mipo.training.forward", "mipo.runtime.files", "mipo.data.pairs"})
    assert found == {"mipo.training.forward", "mipo.runtime.files"}
    assert LAYERS[layer_of("mipo.training.forward")] > LAYERS[layer_of("mipo.data.pairs")]
