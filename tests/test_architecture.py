"""The house rules that keep the code walkable, checked on the source itself: the layers import only downwards,
and no module or function grows past the size a reader can hold."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "tidpo_core"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_ROOT_MODULES = 6


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module `path` imports, at the top or inside a function (relative imports resolved against
    `package`, by default the file's own)."""
    tree = ast.parse(path.read_text())
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_from(path: Path, *prefixes: str, package: str | None = None) -> list[str]:
    return sorted(
        m for m in imported_modules(path, package) if any(m == p or m.startswith(p + ".") for p in prefixes)
    )


def test_the_library_never_imports_dagster_or_the_pipeline():
    offenders = {
        str(p.relative_to(REPO)): imports_from(p, "dagster", "dagster_duckdb", "tidpo_pipeline")
        for p in python_files("tidpo_core")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_method_never_imports_the_stages_or_the_store():
    offenders = {
        str(p.relative_to(REPO)): imports_from(
            p, "tidpo_core.steps", "tidpo_core.store", "tidpo_core.training"
        )
        for p in python_files("tidpo_core/method")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_layering_check_sees_lazy_and_relative_imports(tmp_path):
    """The checks above would pass vacuously if the scanner missed imports inside functions."""
    module = tmp_path / "probe.py"
    module.write_text(
        "def f():\n    import dagster\n    from tidpo_core.steps import database_at\n    from ..store import pairs\n"
    )
    assert imports_from(
        module, "dagster", "tidpo_core.steps", "tidpo_core.store", package="tidpo_core.method"
    ) == [
        "dagster",
        "tidpo_core.steps",
        "tidpo_core.steps.database_at",
        "tidpo_core.store",
        "tidpo_core.store.pairs",
    ]


@pytest.mark.parametrize("folder", ["tidpo_core", "tidpo_pipeline", "bench", "stress"])
def test_no_module_or_function_outgrows_a_reading(folder):
    long_modules, long_functions = [], []
    for path in python_files(folder):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.name}: {length} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_librarys_root_keeps_only_a_few_modules_beside_its_packages():
    modules = sorted(p.name for p in CORE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_ROOT_MODULES, modules
    packages = sorted(p.name for p in CORE.iterdir() if (p / "__init__.py").exists())
    assert {
        "method",
        "data",
        "batching",
        "models",
        "evaluation",
        "runtime",
        "training",
        "store",
        "steps",
    } <= set(packages)


def test_the_method_specification_lives_in_the_repository():
    assert (REPO / "docs" / "method.md").exists()
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    outside = [
        name
        for name in tracked
        if name != "tests/test_architecture.py"
        and (REPO / name).is_file()
        and "shared/METHOD.md" in (REPO / name).read_text(errors="ignore")
    ]
    assert not outside, f"files citing the method spec outside the repository: {outside}"
