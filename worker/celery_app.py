"""The Celery app. `celery -A worker.celery_app worker` runs a training worker.

One task at a time per accelerator: prefork with concurrency 1, prefetch 1, late acks (a task
whose worker dies is delivered again), JSON only. Time limits are ordered: the soft limit
lets the loop stop cleanly before the hard limit kills it, and the broker's visibility
timeout outlasts both so a running task is never handed out twice.
"""

from celery import Celery

from app.config import Settings, get_settings

TRAIN_TASK = "softserve.train_job"


def make_celery(settings: Settings) -> Celery:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery = Celery("softserve", broker=settings.broker_url, include=["worker.tasks"])
    celery.conf.update(
        accept_content=["json"],
        task_serializer="json",
        task_ignore_result=True,  # the registry holds job state, not Celery's result backend
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 120,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.redis_url:  # the SQLAlchemy transport passes its options to create_engine
        celery.conf.broker_transport_options = {"visibility_timeout": settings.job_time_limit_s + 3600}
    return celery


app = make_celery(get_settings())
