"""`celery -A worker.celery_app worker` needs the app at module level; importing the module must
still change nothing on disk. The data folder (the embedded broker's home) is made as a worker starts."""

import os
import subprocess
import sys

from tests.conftest import REPO

CHECK = """
import pathlib, sys
from celery.signals import worker_init
import worker.celery_app as module

data = pathlib.Path(sys.argv[1])
assert not data.exists(), "importing worker.celery_app made the data folder"
module.app.loader.import_default_modules()  # what a starting worker does: its tasks are found
assert "softserve.train_job" in module.app.tasks and not data.exists()
worker_init.send(sender=None)  # a worker starting, before it connects to the broker
assert data.is_dir(), "a starting worker did not make the data folder"
"""


def test_importing_the_celery_app_touches_nothing(tmp_path):
    data = tmp_path / "missing" / "data"
    environment = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")} | {"DATA_DIR": str(data)}
    done = subprocess.run([sys.executable, "-c", CHECK, str(data)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == ["missing", "missing/data"]
