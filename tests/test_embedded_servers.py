"""The servers the suite starts itself when a machine runs no PostgreSQL or Redis (tests/services.py).
Started here whatever this machine runs, so that path is tested on every run, not only on bare machines."""

import redis
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from tests import services
from tests.conftest import migrate


def test_embedded_postgres_takes_the_migrations_and_is_gone_afterwards():
    with services.embedded_postgres() as admin_url:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text('CREATE DATABASE "migrated"'))
        url = make_url(admin_url).set(database="migrated").render_as_string(hide_password=False)
        migrate(url)
        database = create_engine(url)
        assert {"adapters", "train_jobs", "api_keys"} <= set(inspect(database).get_table_names())
        database.dispose()
        admin.dispose()
    stopped = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with stopped.connect():
            raise AssertionError("the embedded server still answers after the tests are done with it")
    except OperationalError:
        pass
    finally:
        stopped.dispose()


def test_embedded_redis_stores_and_is_gone_afterwards():
    with services.embedded_redis() as url:
        client = redis.Redis.from_url(url)
        client.set("softserve", "ok")
        assert client.get("softserve") == b"ok"
        client.close()
    assert not services.redis_answers(url)
