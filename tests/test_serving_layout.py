"""serving/ keeps its levels apart: ops < layers < bank < http, a level imports only the ones below it,
and serving never imports training."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVING = Path(__file__).resolve().parents[1] / "serving"
LEVELS = ["ops", "layers", "bank", "http"]


def imported_modules(path: Path) -> list[str]:
    """Absolute names of the modules `path` imports (relative imports resolved), at any depth in the file."""
    package = ".".join(path.relative_to(SERVING.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def level_of(module: str) -> int | None:
    parts = module.split(".")
    return LEVELS.index(parts[1]) if parts[0] == "serving" and len(parts) > 1 and parts[1] in LEVELS else None


@pytest.mark.parametrize("level", LEVELS)
def test_a_level_imports_only_the_levels_below_it(level):
    for path in sorted((SERVING / level).glob("*.py")):
        for module in imported_modules(path):
            used = level_of(module)
            assert used is None or used <= LEVELS.index(level), f"{path.name} in {level} imports {module}"


def test_serving_never_imports_training():
    for path in sorted(SERVING.rglob("*.py")):
        assert not any(m == "training" or m.startswith("training.") for m in imported_modules(path)), path
