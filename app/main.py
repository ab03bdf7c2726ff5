"""App factory and lifespan: the base model is loaded once per process, before serving."""

import copy
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app import admin, auth
from app.api import (
    adapters,
    errors,
    files,
    fine_tuning,
    generate,
    health,
    job_webhooks,
    metrics,
    openai_chat,
    openai_compat,
    train_jobs,
)
from app.api.limits import BodySizeLimit
from app.config import Settings, get_settings
from app.engine.loader import BaseModel
from app.observability import RequestObserver
from app.runtime import NodeService, Runtime, running, serving

log = logging.getLogger(__name__)

# Bodies other than uploads are small JSON.
DEFAULT_BODY_LIMIT = 1024 * 1024


def create_app(settings: Settings | None = None, base: BaseModel | None = None,
               services: Sequence[NodeService] = (), trains: bool = False) -> FastAPI:
    """Build the app. Tests may pass a preloaded `base` so many apps share one model; `services`
    run beside the engine (worker.node passes the training consumer, and `trains`)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with running(settings, base, serves=True, trains=trains) as runtime:
            check_open_mode(runtime)
            async with serving(runtime, services):
                app.state.runtime = runtime
                yield

    app = FastAPI(
        title="softserve",
        version="0.1.0",
        description="Serve and train soft-prompt adapters on one resident int8 base model.",
        lifespan=lifespan,
        exception_handlers={RequestValidationError: errors.request_validation_error, 405: errors.method_not_allowed},
    )
    document_limits(app, settings)
    app.add_middleware(
        BodySizeLimit,
        limits={
            ("POST", "/adapters"): settings.max_adapter_upload_bytes * 2 + 64 * 1024,
            ("POST", "/train-jobs"): settings.max_dataset_bytes * 2 + 64 * 1024,
            ("POST", "/v1/files"): settings.max_dataset_bytes + 64 * 1024,
        },
        default=DEFAULT_BODY_LIMIT,
    )
    app.add_middleware(auth.SessionCookies, secret_key=auth.session_secret(settings))
    app.add_middleware(RequestObserver)  # it sees every answer, refusals included
    # The client's address and scheme as a trusted proxy forwards them (uvicorn's own middleware,
    # run here rather than by uvicorn so that the direct peer is known too: DirectPeer).
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.forwarded_allow_ips)
    app.add_middleware(auth.DirectPeer)
    app.state.login_throttle = auth.LoginThrottle(settings.login_max_failures, settings.login_failure_window_s,
                                                  settings.login_max_failures_per_peer)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.mount(admin.STATIC_PATH, admin.static_files, name="admin-static")
    for router in (generate.router, openai_compat.router, openai_chat.router, files.router, fine_tuning.router,
                   adapters.router, train_jobs.router, job_webhooks.router, metrics.router):
        app.include_router(router, dependencies=[auth.InferenceAuth])
    return app


def document_limits(app: FastAPI, settings: Settings) -> None:
    """Put this node's request limits, which are settings, into its OpenAPI schema as maxima, so a
    request the schema admits is not refused for them."""
    make_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make_schema()
            models = schema["components"]["schemas"]
            models["GenerateRequest"]["properties"]["max_new_tokens"]["maximum"] = settings.max_new_tokens_limit
            models["CompletionRequest"]["properties"]["max_tokens"]["maximum"] = settings.max_new_tokens_limit
            for field in ("max_completion_tokens", "max_tokens"):  # integer or null: the integer's branch
                models["ChatCompletionRequest"]["properties"][field]["anyOf"][0]["maximum"] = settings.max_new_tokens_limit
            job = schema["paths"]["/train-jobs"]["post"]
            job["requestBody"] = copy.deepcopy(job["requestBody"])  # the route's own dict, shared by every app
            form = job["requestBody"]["content"]["multipart/form-data"]["schema"]
            form["properties"]["num_virtual_tokens"]["maximum"] = settings.max_virtual_tokens
        return app.openapi_schema

    app.openapi = openapi


def check_open_mode(runtime: Runtime) -> None:
    """With no API keys, serve openly only on localhost, and say so."""
    with runtime.sessions() as session:
        if auth.any_keys(session):
            return
    host = runtime.settings.host
    if not auth.is_loopback(host):
        raise RuntimeError(
            f"no API keys exist and HOST is {host}: refusing to serve openly beyond localhost. "
            "Create an admin key first: python -m app.cli create-key --role admin"
        )
    log.warning(
        "no API keys configured: serving OPEN (no auth) to local clients on %s. "
        "Create keys with: python -m app.cli create-key --role admin|inference", host,
    )
