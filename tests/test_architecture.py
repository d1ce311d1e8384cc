"""The package's shape, kept: short functions, no import cycles, one-way layering, no citations out of the repo.

All read from the source with ``ast``: nothing is imported or run.
"""

import ast
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vpns_jax"
MAX_FUNCTION_LINES = 60
SUBPACKAGES = ("config", "core", "data", "io", "methods", "models")
# The top-level modules: entry points and the trainer's pieces (train, main, context, cli, config_checks, ...).
ENTRY_POINTS = tuple(sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"))
# One-way layering: what each subpackage must not import (subpackages and top-level modules of vpns_jax).
FORBIDDEN = {
    "models": ("config", "core", "data", "io", "methods", *ENTRY_POINTS),
    "core": ("config", "data", "io", "methods", *ENTRY_POINTS),
    "methods": ("config", "data", "io", "context", "main", "train"),
}


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The package's modules that ``name`` imports, at module level or inside functions (relative imports
    resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + (path.stem == "__init__")]
                module = ".".join(package + ([module] if module else []))
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _layer(module: str) -> str:
    """The subpackage or top-level module of vpns_jax holding ``module`` ('' for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(subpackage: str, forbidden: tuple[str, ...],
                        modules: dict[str, pathlib.Path]) -> dict[str, list[str]]:
    """Module of ``subpackage`` -> the modules it imports from ``forbidden`` layers."""
    found = {}
    for name, path in modules.items():
        if _layer(name) == subpackage:
            bad = sorted(t for t in _imports(name, path, modules) if _layer(t) in forbidden)
            if bad:
                found[name] = bad
    return found


def function_lengths() -> dict[str, int]:
    """'module:function' -> lines, for every function and method of the package."""
    lengths = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_function_is_longer_than_60_lines():
    long = {k: v for k, v in function_lengths().items() if v > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_import_cycles_also_through_function_level_imports():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package imports its own submodules (its __init__ re-exports them): only edges between modules count.
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("importer, allowed", [
    ("vpns_jax.core", ("vpns_jax.core", "vpns_jax.models")),
    # The forkable example: training from the core (and the recipe's iterations); the models and data as inputs.
    ("experiments.functional_loop", ("vpns_jax.core", "vpns_jax.models", "vpns_jax.data",
                                     "vpns_jax.methods.iterations")),
])
def test_the_core_and_the_functional_example_import_only_the_core(importer, allowed):
    modules = _modules()
    if importer == "vpns_jax.core":
        files = {n: p for n, p in modules.items() if n.startswith("vpns_jax.core")}
    else:
        files = {importer: REPO / "experiments" / "functional_loop.py"}
    for name, path in files.items():
        outside = {t for t in _imports(name, path, modules) if not t.startswith(allowed)}
        assert not outside, f"{name} imports {outside}"


@pytest.mark.parametrize("subpackage, forbidden", sorted(FORBIDDEN.items()))
def test_layering_is_one_way(subpackage, forbidden):
    assert set(forbidden) <= set(SUBPACKAGES) | set(ENTRY_POINTS), "a rule names no part of the package"
    violations = layering_violations(subpackage, forbidden, _modules())
    assert not violations, f"{subpackage}/ must import none of {forbidden}: {violations}"


def test_the_layering_check_sees_absolute_relative_and_function_level_imports(tmp_path):
    fake = tmp_path / "fake.py"
    modules = {**_modules(), "vpns_jax.models.fake": fake}
    for source, found in [
        ("from vpns_jax.core import masking\n", ["vpns_jax.core", "vpns_jax.core.masking"]),
        ("def f():\n    import vpns_jax.io.workdir\n", ["vpns_jax.io.workdir"]),
        ("from ..data import pipeline\n", ["vpns_jax.data", "vpns_jax.data.pipeline"]),
        ("from vpns_jax import train\n", ["vpns_jax.train"]),
        ("from vpns_jax.models import layers\n", None),
    ]:
        fake.write_text(source)
        violations = layering_violations("models", FORBIDDEN["models"], modules)
        assert violations.get("vpns_jax.models.fake") == found, source


def test_the_package_is_subpackages_and_entry_points():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == sorted(SUBPACKAGES)
    assert len(top) <= 12, top


def test_no_tracked_file_cites_anything_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    # Spelled in pieces, so that this file does not cite what it looks for.
    outside = ("vpns-" + "method.md", ".." + "/shared/", "shared/" + "reference")
    offenders = [f for f in files if (REPO / f).is_file()
                 and any(s in (REPO / f).read_text(errors="ignore") for s in outside)]
    assert not offenders, offenders
