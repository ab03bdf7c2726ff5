"""Celery tasks: thin wrappers. The model and the database engine are created lazily in the
worker's child process (after fork), once per process."""

from functools import cache

from app.config import get_settings
from app.db import make_engine, make_session_factory
from app.engine.loader import BaseModel, load_base_model
from app.job_queue import TRAIN_TASK
from worker.celery_app import app
from worker.runner import run_job


@cache
def _base() -> BaseModel:
    s = get_settings()
    return load_base_model(s.base_model, s.model_cache_dir, s.quantization, s.device, s.llm_int8_threshold)


@cache
def _sessions():
    return make_session_factory(make_engine(get_settings().database_url))


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> str:
    return run_job(job_id, settings=get_settings(), sessions=_sessions(), get_base=_base)
