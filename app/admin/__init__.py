"""The admin web UI at /admin: server-rendered pages that drive the JSON API from the browser."""

from fastapi import APIRouter
from fastapi.staticfiles import StaticFiles

from app.admin import adapters, jobs, login, overview, playground
from app.admin.pages import STATIC_DIR, STATIC_PATH

router = APIRouter()
for module in (login, overview, adapters, jobs, playground):
    router.include_router(module.router)

static_files = StaticFiles(directory=STATIC_DIR)

__all__ = ["router", "static_files", "STATIC_PATH"]
