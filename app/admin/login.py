"""Log in to the admin pages with an admin API key, and log out."""

from typing import Annotated

from fastapi import Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse

from app import auth
from app.admin.pages import LOGIN_PATH, page_router, render
from app.api.deps import RuntimeDep
from app.runtime import Runtime

router = page_router(gated=False)


def _safe_next(target: str | None) -> str:
    """Only back into the admin pages: never an open redirect to another site."""
    if target and target.startswith("/admin") and not target.startswith("//"):
        return target
    return "/admin"


def _form(request: Request, next_: str, error: str | None = None, status_code: int = 200):
    return render(request, "login.html", status_code=status_code, next=next_, error=error)


def _is_admin(request: Request, runtime: Runtime) -> bool:
    try:
        return auth.authenticate(request, runtime).role == "admin"
    except HTTPException:
        return False


@router.get("/login")
def login_form(request: Request, runtime: RuntimeDep, next_: Annotated[str | None, Query(alias="next")] = None):
    if _is_admin(request, runtime):  # already in (or open mode): nothing to log in to
        return RedirectResponse(_safe_next(next_), status_code=303)
    return _form(request, _safe_next(next_))


@router.post("/login")
def login(
    request: Request,
    runtime: RuntimeDep,
    api_key: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next_: Annotated[str, Form(alias="next")] = "",
):
    target = _safe_next(next_)
    throttle: auth.LoginThrottle = request.app.state.login_throttle
    client, peer = request.client.host if request.client else "", auth.direct_peer(request)
    wait = throttle.retry_after(client, peer)
    if wait:
        response = _form(request, target, f"Too many failed logins from your address. Try again in {wait} s.", 429)
        response.headers["Retry-After"] = str(wait)
        return response
    if not auth.valid_csrf(request, csrf_token):
        return _form(request, target, "This form expired. Please try again.", 403)
    with runtime.sessions() as session:
        key = auth.find_key(session, api_key.strip())
        if key is None:
            throttle.failed(client, peer)
            return _form(request, target, "That key is not valid.", 401)
        if key.role != "admin":
            return _form(request, target, "That is an inference key; the admin pages need an admin key.", 403)
        throttle.succeeded(client)
        token = auth.start_admin_session(session, key)
    # A fresh session at login: nothing set before (say, by a planted cookie) carries over.
    request.session.clear()
    request.session[auth.SESSION_TOKEN] = token
    return RedirectResponse(target, status_code=303)


@router.post("/logout")
def logout(request: Request, runtime: RuntimeDep, csrf_token: Annotated[str, Form()] = ""):
    if auth.valid_csrf(request, csrf_token):  # another site must not be able to log you out
        token = request.session.get(auth.SESSION_TOKEN)
        if isinstance(token, str):  # ended on the server too: a copy of the cookie logs nobody in
            with runtime.sessions() as session:
                auth.end_admin_session(session, token)
        request.session.clear()
    return RedirectResponse(LOGIN_PATH, status_code=303)
