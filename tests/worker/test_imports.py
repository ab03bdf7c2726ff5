"""Importing the node's modules changes nothing on disk and starts nothing: the data folder (the
embedded broker's home) is made when a node starts."""

import os
import subprocess
import sys

from tests.conftest import REPO

CHECK = """
import pathlib, sys, threading
import worker.node, worker.consumer

data = pathlib.Path(sys.argv[1])
assert not data.exists(), "importing the node made the data folder"
assert threading.active_count() == 1, threading.enumerate()
"""


def test_importing_the_node_touches_nothing(tmp_path):
    data = tmp_path / "missing" / "data"
    environment = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")} | {"DATA_DIR": str(data)}
    done = subprocess.run([sys.executable, "-c", CHECK, str(data)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.rglob("*")) == []
