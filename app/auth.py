"""API keys, roles, admin browser sessions and CSRF protection.

Two roles: an `inference` key may generate and read; an `admin` key may also manage adapters
and jobs. Keys look like `ssk_<id>_<secret>`; only their SHA-256 is stored, and it is compared
in constant time. The admin pages log in once with an admin key and then ride a signed session
cookie naming a server-side session (logout deletes it); a request authenticated by that cookie
must also carry the session's CSRF token. Failed logins are throttled per client address.
With no keys at all the service is open, which it allows only when bound to localhost.
"""

import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import RuntimeDep
from app.config import Settings
from app.db import get_by_id, make_engine, make_session_factory
from app.models import AdminSession, ApiKey, ClusterSecret, new_id, utcnow

Role = Literal["inference", "admin"]
ROLES: tuple[Role, ...] = ("inference", "admin")
KEY_PREFIX = "ssk"
SESSION_COOKIE = "softserve_session"
SESSION_MAX_AGE_S = 12 * 3600
SESSION_TOKEN = "admin_session"
SESSION_CSRF = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _digest(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, role: Role, name: str) -> tuple[ApiKey, str]:
    """Store a new key's hash; return the row and the key itself (shown only this once)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    key_id = new_id()
    plaintext = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, name=name, role=role, key_sha256=_digest(plaintext))
    session.add(row)
    session.commit()
    return row, plaintext


def find_key(session: Session, presented: str) -> ApiKey | None:
    prefix, _, rest = presented.partition("_")
    key_id = rest.partition("_")[0]
    row = get_by_id(session, ApiKey, key_id) if prefix == KEY_PREFIX and key_id else None
    if row is None or not hmac.compare_digest(row.key_sha256.encode(), _digest(presented).encode()):
        return None
    return row


def any_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def session_secret(settings: Settings) -> str:
    """SECRET_KEY, or a random one kept in the registry's database: every node sharing the
    database signs and reads the same admin cookies. An install that kept one under DATA_DIR
    (before 0006) keeps it: the first node to need a secret adopts that file's."""
    if settings.secret_key:
        return settings.secret_key
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return shared_secret(session, "session", lambda: _legacy_secret(settings) or secrets.token_urlsafe(48))
    finally:
        engine.dispose()


def shared_secret(session: Session, name: str, make: Callable[[], str]) -> str:
    """The secret called `name`, made by `make` if no node has made it yet."""
    if session.get(ClusterSecret, name) is None:
        session.add(ClusterSecret(name=name, value=make()))
        try:
            session.commit()
        except IntegrityError:  # another node made it first: theirs it is
            session.rollback()
    return session.get(ClusterSecret, name).value


def _legacy_secret(settings: Settings) -> str | None:
    path = settings.data_dir / "secret_key"
    secret = path.read_text().strip() if path.is_file() else ""
    return secret if len(secret) >= 32 else None


def start_admin_session(session: Session, key: ApiKey) -> str:
    """Record a login; the returned token goes into the signed cookie."""
    now = utcnow()
    session.execute(delete(AdminSession).where(AdminSession.expires_at <= now))  # housekeeping
    token = secrets.token_urlsafe(32)
    session.add(AdminSession(token_sha256=_digest(token), key_id=key.id, created_at=now,
                             expires_at=now + timedelta(seconds=SESSION_MAX_AGE_S)))
    session.commit()
    return token


def end_admin_session(session: Session, token: str) -> None:
    session.execute(delete(AdminSession).where(AdminSession.token_sha256 == _digest(token)))
    session.commit()


def admin_session_key(session: Session, token: str) -> ApiKey | None:
    """The key a live (not logged out, not expired) admin session was opened with."""
    row = session.get(AdminSession, _digest(token))
    if row is None or row.expires_at <= utcnow():
        return None
    return session.get(ApiKey, row.key_id)


class SessionCookies:
    """Starlette's signed-cookie sessions, with the cookie marked `Secure` when the request came
    over HTTPS. Behind a TLS proxy the scheme is the proxy's X-Forwarded-Proto, which uvicorn
    applies only for proxies it trusts (FORWARDED_ALLOW_IPS, 127.0.0.1 by default)."""

    def __init__(self, app: ASGIApp, secret_key: str) -> None:
        options = dict(secret_key=secret_key, session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE_S, same_site="lax")
        self.plain = SessionMiddleware(app, **options)
        self.secure = SessionMiddleware(app, https_only=True, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sessions = self.secure if scope.get("scheme") in ("https", "wss") else self.plain
        await sessions(scope, receive, send)


class DirectPeer:
    """ASGI middleware, outermost: keeps the address of the peer that opened the connection
    (`scope["softserve.peer"]`) before forwarded headers replace the client's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["softserve.peer"] = scope["client"][0] if scope.get("client") else ""
        await self.app(scope, receive, send)


def direct_peer(request: Request) -> str:
    return request.scope.get("softserve.peer") or (request.client.host if request.client else "")


class LoginThrottle:
    """Failed admin logins per client address: after `max_failures` within `window_s`, every login
    from that address is refused until the oldest of them leaves the window; and per direct peer,
    after `max_failures_per_peer`, whatever client addresses it forwarded (a client that makes
    them up is stopped too). Kept in memory, per API process. Keys carry 256 random bits, so this
    stops scripted guessing from flooding the server and its logs rather than protecting a weak
    secret."""

    def __init__(self, max_failures: int, window_s: float, max_failures_per_peer: int | None = None,
                 clock=time.monotonic) -> None:
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self.max_failures_per_peer = max_failures_per_peer or max_failures
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # login runs in the threadpool

    def _keys(self, client: str, peer: str | None) -> list[tuple[str, int]]:
        """The counters a login counts in: its client address's, and its direct peer's."""
        keys = [(f"client {client}", self.max_failures)]
        if peer is not None:
            keys.append((f"peer {peer}", self.max_failures_per_peer))
        return keys

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client, deque())
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, client: str, peer: str | None = None) -> int:
        """Seconds until `client`, through `peer`, may try again; 0 when it may now."""
        with self._lock:
            now = self.clock()
            waits = [0]
            for key, limit in self._keys(client, peer):
                failures = self._recent(key, now)
                if len(failures) >= limit:
                    waits.append(max(1, math.ceil(failures[-limit] + self.window_s - now)))
            return max(waits)

    def failed(self, client: str, peer: str | None = None) -> None:
        with self._lock:
            now = self.clock()
            for key, _ in self._keys(client, peer):
                failures = self._failures[key] = self._recent(key, now)
                failures.append(now)
            if len(self._failures) > 10_000:  # many addresses: forget those with no recent failure
                for other in [c for c in self._failures if not self._recent(c, now)]:
                    del self._failures[other]

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(f"client {client}", None)


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use; admin forms and scripts send it back."""
    token = request.session.get(SESSION_CSRF)
    if token is None:
        token = request.session[SESSION_CSRF] = secrets.token_urlsafe(32)
    return token


def valid_csrf(request: Request, sent: str | None) -> bool:
    expected = request.session.get(SESSION_CSRF)
    return bool(expected and sent and hmac.compare_digest(expected.encode(), sent.encode()))


def _cross_origin(request: Request) -> bool:
    """A browser request sent by another site's page (what CSRF looks like)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is not None and origin.split("://", 1)[-1] != request.headers.get("host")


def _local_request(request: Request) -> bool:
    """From this machine, addressed to this machine: a page on another site that rebinds its
    DNS name to 127.0.0.1 still sends its own name as Host."""
    client = request.client.host if request.client else ""
    host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
    return is_loopback(client) and is_loopback(host)


@dataclass(frozen=True)
class Caller:
    role: Role
    via: Literal["key", "session", "open"]
    key_id: str | None = None
    key_name: str | None = None


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request, runtime: RuntimeDep) -> Caller:
    """Who is calling: a Bearer key, an admin browser session, or anyone (open mode)."""
    header = request.headers.get("authorization")
    with runtime.sessions() as session:
        # Open mode ignores credentials: clients such as `openai` always send some key.
        is_open = not any_keys(session)
        if is_open and not is_loopback(runtime.settings.host):
            raise _unauthorized("no API keys exist and the server is not bound to localhost; create one with "
                                "`python -m app.cli create-key --role admin`")
        if header is not None and not is_open:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthorized("Authorization header must be 'Bearer <api key>'")
            key = find_key(session, token.strip())
            if key is None:
                raise _unauthorized("invalid API key")
            return Caller(key.role, "key", key.id, key.name)
        # A browser sends cookies along on cross-site requests (it never adds a key header).
        unsafe = request.method not in SAFE_METHODS
        if unsafe and _cross_origin(request):
            raise HTTPException(403, detail="cross-origin request refused (CSRF protection)")
        if is_open:
            if not _local_request(request):
                raise _unauthorized("this server has no API keys, so it serves only local clients that address it "
                                    "as localhost; create keys with `python -m app.cli create-key`")
            return Caller("admin", "open")
        token = request.session.get(SESSION_TOKEN)
        key = admin_session_key(session, token) if isinstance(token, str) else None
        if key is not None and key.role == "admin":
            if unsafe and not valid_csrf(request, request.headers.get(CSRF_HEADER)):
                raise HTTPException(403, detail=f"missing or wrong {CSRF_HEADER} header for this admin session")
            return Caller("admin", "session", key.id, key.name)
    raise _unauthorized("missing API key: send 'Authorization: Bearer <api key>'")


def require_admin(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    if caller.role != "admin":
        raise HTTPException(403, detail="this route needs an admin key; an inference key may only generate and read")
    return caller


InferenceAuth = Depends(authenticate)
AdminAuth = Depends(require_admin)
