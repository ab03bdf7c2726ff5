"""App factory and lifespan: the base model is loaded once per process, before serving."""

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import adapters, generate, health, train_jobs
from app.api.limits import BodySizeLimit
from app.config import Settings, get_settings
from app.db import make_engine, make_session_factory
from app.engine.loader import BaseModel, load_base_model
from app.runtime import Runtime

log = logging.getLogger(__name__)

# Bodies other than uploads are small JSON.
DEFAULT_BODY_LIMIT = 1024 * 1024


def create_app(settings: Settings | None = None, base: BaseModel | None = None) -> FastAPI:
    """Build the app. Tests may pass a preloaded `base` so many apps share one model."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model = base or load_base_model(
            settings.base_model, settings.model_cache_dir, settings.quantization, settings.device,
            settings.llm_int8_threshold,
        )
        log.info("serving %s (%s) on %s", model.fingerprint, model.quantization, model.device)
        engine = make_engine(settings.database_url)
        runtime = Runtime.build(settings, model, make_session_factory(engine))
        runtime.scheduler.start()
        reaper = asyncio.create_task(runtime.reap_forever(), name="job-reaper")
        app.state.runtime = runtime
        try:
            yield
        finally:
            reaper.cancel()
            await runtime.scheduler.stop()
            engine.dispose()

    app = FastAPI(
        title="softserve",
        version="0.1.0",
        description="Serve and train soft-prompt adapters on one resident int8 base model.",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodySizeLimit,
        limits={
            ("POST", "/adapters"): settings.max_adapter_upload_bytes * 2 + 64 * 1024,
            ("POST", "/train-jobs"): settings.max_dataset_bytes * 2 + 64 * 1024,
        },
        default=DEFAULT_BODY_LIMIT,
    )
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(adapters.router)
    app.include_router(train_jobs.router)
    return app
