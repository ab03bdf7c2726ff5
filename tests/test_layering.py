"""How the core's modules depend on each other. app/ never imports the worker package: the API
describes (app.train_config) and sends (app.job_queue) jobs on its own. A module of routes never
imports another: what two routers share lives in a service module (app.api.completion_service,
app.api.job_view)."""

import ast
from pathlib import Path

from tests.conftest import REPO

MODULES = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
           for path in (REPO / "app").rglob("*.py")}


def imported_modules(tree: ast.Module):
    """Every module an import statement may load: `from a import b` names a and a.b."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def defines_routes(tree: ast.Module) -> bool:
    """Whether it declares routes (`@router.get(...)`), not merely gathers other modules' routers."""
    return any(isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
               and isinstance(decorator.func.value, ast.Name) and decorator.func.value.id == "router"
               for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
               for decorator in node.decorator_list)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def test_app_never_imports_worker():
    offenders = [f"{name}: {imported}" for name, path in sorted(MODULES.items())
                 for imported in imported_modules(parse(path)) if imported.split(".")[0] == "worker"]
    assert offenders == []


def test_route_modules_do_not_import_each_other():
    routes = {name for name, path in MODULES.items() if defines_routes(parse(path))}
    assert {"app.api.generate", "app.api.openai_compat", "app.api.train_jobs", "app.admin.jobs"} <= routes
    offenders = [f"{name}: {imported}" for name in sorted(routes)
                 for imported in imported_modules(parse(MODULES[name])) if imported in routes - {name}]
    assert offenders == []
