"""The suite's layout: shared helpers live in tests/helpers.py or conftest.py's fixtures, not in test modules.

A test module that imports another ties the two together: moving or renaming a test breaks an unrelated module,
and an imported test function or fixture is collected in both.
"""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def imported_modules(source: str, package: str) -> set[str]:
    """Dotted names of the modules ``source`` (a module of ``package``) imports; ``from p import x`` adds p.x."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: the module's own package for ".", its parent for "..", ...
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imported_test_modules(source: str, package: str) -> list[str]:
    """The test modules (tests.**.test_*, conftest) among those ``source`` imports."""
    return sorted(name for name in imported_modules(source, package)
                  if name.split(".")[0] == "tests" and name.split(".")[-1].startswith(("test_", "conftest")))


def test_no_test_module_imports_another_test_module():
    offenders = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        package = ".".join(path.relative_to(TESTS.parent).parent.parts)
        if names := imported_test_modules(path.read_text(), package):
            offenders[str(path.relative_to(TESTS.parent))] = names
    assert offenders == {}, "import shared helpers from tests/helpers.py (or take a conftest.py fixture)"


def test_the_check_sees_each_form_of_import():
    sources = {"from tests.test_a import x": "tests.test_a", "from tests import test_b": "tests.test_b",
               "import tests.data.test_c": "tests.data.test_c", "from .test_d import y": "tests.data.test_d",
               "from ..conftest import z": "tests.conftest"}
    for source, name in sources.items():
        assert name in imported_test_modules(source, "tests.data"), source
    helpers_only = "from tests.helpers import x\nfrom tests import helpers\nimport pytest"
    assert imported_test_modules(helpers_only, "tests.data") == []
