"""The engine's split stays a split: rows, slots and the model runner sit below the core, which
sits below the serving engine, and none of them imports upward."""

import ast

import pytest

from tests.conftest import REPO

# Each module, and the engine modules it must never import.
BELOW = {
    "app.engine.rows": {"app.engine.slots", "app.engine.model_runner", "app.engine.core", "app.engine.engine"},
    "app.engine.events": {"app.engine.core", "app.engine.engine"},
    "app.engine.slots": {"app.engine.model_runner", "app.engine.core", "app.engine.engine"},
    "app.engine.model_runner": {"app.engine.core", "app.engine.engine"},
    "app.engine.turns": {"app.engine.core", "app.engine.engine"},
    "app.engine.core": {"app.engine.engine"},
}


def imported(module: str) -> set[str]:
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


@pytest.mark.parametrize("module", sorted(BELOW))
def test_engine_modules_never_import_upward(module):
    assert imported(module) & BELOW[module] == set()
