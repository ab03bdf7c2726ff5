"""The training-job queue, shared by the API (which sends jobs) and the workers (which run them):
the Celery app's settings and the task's name. In the core, so the API never imports the worker package.

One task at a time per node: its consumer (worker.consumer) runs the solo pool, with prefetch 1,
late acks (a task whose node dies is delivered again) and JSON only. Celery's time limits need
the prefork pool, so a run enforces JOB_TIME_LIMIT_S itself (worker.job_runner); the broker's
visibility timeout outlasts it, so a running task is never handed out twice.
"""

from celery import Celery

from app.config import Settings

TRAIN_TASK = "softserve.train_job"  # its one argument is the job id; the registry holds the rest


def make_celery(settings: Settings) -> Celery:
    """The configured app; it touches neither disk nor network until it sends or consumes."""
    celery = Celery("softserve", broker=settings.broker_url)
    celery.conf.update(
        accept_content=["json"],
        task_serializer="json",
        task_ignore_result=True,  # the registry holds job state, not Celery's result backend
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.redis_url:  # the SQLAlchemy transport passes its options to create_engine
        celery.conf.broker_transport_options = {"visibility_timeout": settings.job_time_limit_s + 3600}
    return celery


def make_data_dir(settings: Settings) -> None:
    """The embedded broker is a SQLite file in the data folder: make it before the first connection."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
