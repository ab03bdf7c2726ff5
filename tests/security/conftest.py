"""Fixtures for the hardening regression tests: the real app on the tiny model, on either database."""

import json

import pytest


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


@pytest.fixture(params=["sqlite", "postgres"])
def db_client(request, make_client, tiny_base):
    """The real app on a fresh SQLite file, then on a fresh PostgreSQL database."""
    return make_client(tiny_base, database_url=request.getfixturevalue(f"{request.param}_url"))


def strict_json(response):
    """The body as JSON that any client can read: UTF-8, and no NaN or Infinity literals."""
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)
