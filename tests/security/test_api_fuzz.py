"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis), over real HTTP
against the app on the tiny model, with an admin key: whatever the inputs, never a 5xx."""

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from schemathesis.config import SchemathesisConfig

from app import auth
from app.config import Settings
from app.main import create_app


@pytest.fixture
def fuzzed_server(make_live_server, tiny_base):
    # A small token limit keeps each generated request quick; larger values are refused with 422.
    server = make_live_server(tiny_base, max_new_tokens_limit=8, request_timeout_s=60)
    with server.runtime.sessions() as session:
        _, server.admin_key = auth.create_key(session, "admin", "fuzz")
    return server


# The schema depends only on the routes: read it from an app that is built but never started.
# Valid and invalid inputs both (out of range, wrong types, huge numbers): neither may be a 5xx.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(secret_key="fuzz", data_dir=Path(tempfile.gettempdir()))).openapi(),
    config=SchemathesisConfig.from_dict({"generation": {"mode": "all"}}),
)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case, fuzzed_server):
    response = case.call(base_url=fuzzed_server.url, headers={"Authorization": f"Bearer {fuzzed_server.admin_key}"},
                         timeout=60)
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
