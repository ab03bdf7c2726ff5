"""What every admin page shares: the templates, the admin gate, and error pages.

Pages answer in HTML even when they fail: a dependency that needs to send the browser
elsewhere (to the login form) or show an error raises PageExit, and PageRoute answers with its
response. Query parameters that fail validation get an HTML page too, instead of JSON.
"""

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from app import auth
from app.admin import formatting
from app.admin.paging import PER_PAGE_CHOICES, page_url
from app.api.deps import RuntimeDep

APP_DIR = Path(__file__).resolve().parent.parent
STATIC_DIR = APP_DIR / "static"
STATIC_PATH = "/admin/static"
LOGIN_PATH = "/admin/login"


@dataclass(frozen=True)
class Viewer:
    """Who is looking at an admin page; the layout shows the key's name or the open-mode badge."""

    open_mode: bool
    key_name: str | None = None


def _layout_context(request: Request) -> dict:
    return {"csrf_token": auth.csrf_token(request), "viewer": getattr(request.state, "viewer", None),
            "static": STATIC_PATH}


templates = Jinja2Templates(directory=APP_DIR / "templates", context_processors=[_layout_context])
templates.env.filters.update(formatting.FILTERS)
templates.env.globals.update(page_url=page_url, per_page_choices=PER_PAGE_CHOICES)


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status_code=status_code, status=status_code, message=message)


class PageExit(Exception):
    """Stop handling a page and answer with `response` (a redirect or an error page)."""

    def __init__(self, response):
        super().__init__(response.status_code)
        self.response = response


def not_found(request: Request, what: str) -> PageExit:
    return PageExit(error_page(request, 404, f"{what} does not exist (or was deleted)."))


class PageRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except PageExit as exit_:
                return exit_.response
            except RequestValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
                return error_page(request, 422, f"Invalid address: {problems}")

        return handle


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{LOGIN_PATH}?{urlencode({'next': target})}", status_code=303)


def admin_gate(request: Request, runtime: RuntimeDep) -> None:
    """In front of every admin page but the login form: not logged in -> the login form (pages are
    GET, so 401 is the only refusal authenticate can give); not admin -> 403."""
    try:
        caller = auth.authenticate(request, runtime)
    except HTTPException:
        raise PageExit(login_redirect(request)) from None
    if caller.role != "admin":
        raise PageExit(error_page(request, 403, "These pages need an admin key; an inference key may only "
                                                "generate and read through the API."))
    request.state.viewer = Viewer(open_mode=caller.via == "open", key_name=caller.key_name)


def page_router(*, gated: bool = True) -> APIRouter:
    """A router for admin pages: HTML errors, hidden from the API schema, gated unless told."""
    return APIRouter(prefix="/admin", route_class=PageRoute, include_in_schema=False,
                     dependencies=[Depends(admin_gate)] if gated else [])
