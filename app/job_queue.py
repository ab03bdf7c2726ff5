"""The training-job queue, shared by the API (which sends jobs) and the workers (which run them):
the Celery app's settings and the task's name. In the core, so the API never imports the worker package.

One task at a time per accelerator: prefork with concurrency 1, prefetch 1, late acks (a task
whose worker dies is delivered again), JSON only. Time limits are ordered: the soft limit
lets the loop stop cleanly before the hard limit kills it, and the broker's visibility
timeout outlasts both so a running task is never handed out twice.
"""

from collections.abc import Sequence

from celery import Celery

from app.config import Settings

TRAIN_TASK = "softserve.train_job"  # its one argument is the job id; the registry holds the rest


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """The configured app; it touches neither disk nor network until it sends or consumes.
    `include`: the modules that define the tasks, for a worker to import."""
    celery = Celery("softserve", broker=settings.broker_url, include=list(include))
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


def make_data_dir(settings: Settings) -> None:
    """The embedded broker is a SQLite file in the data folder: make it before the first connection."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
