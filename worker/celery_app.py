"""The worker's Celery app: `celery -A worker.celery_app worker` runs a training worker.

Celery needs the app at module level, so importing this module builds it, with no side effect:
the data folder (where the embedded broker lives) is made when a worker starts, not here.
"""

from celery.signals import worker_init

from app.config import get_settings
from app.job_queue import make_celery, make_data_dir

settings = get_settings()
app = make_celery(settings, include=["worker.tasks"])


@worker_init.connect
def _make_data_dir(**_) -> None:  # sent as a worker starts, before it connects to the broker
    make_data_dir(settings)
