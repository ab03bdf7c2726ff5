"""Property-based fuzzing of every operation in the OpenAPI schema with schemathesis' own runner,
over real HTTP against the app on the tiny model, in open mode (no keys: local clients may do
anything) and with an admin key: its examples, its coverage of every boundary and wrong type and
method, and random inputs. Every check is on -- never a 5xx, responses (status, content type,
headers, body) as documented, wrong inputs refused, `Allow` on 405 naming the path's methods --
except one: positive_data_acceptance, since JSON Schema cannot state every rule a valid request
must meet (a prompt's limit is in tokens, not characters; 1.0 counts as an integer there, and this
API takes JSON's integers as written; a dataset's or an adapter file's contents).
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app import auth

SCHEMATHESIS = Path(sys.executable).parent / "st"


def schemathesis(schema: str, tmp_path: Path, *options: str) -> None:
    """Run every phase and check (but positive_data_acceptance) on `schema`; fail with its report."""
    run = subprocess.run(
        [str(SCHEMATHESIS), "--no-color", "run", schema, *options, "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--phases", "examples,coverage,fuzzing",
         "--max-examples", "30", "--seed", "21", "--workers", "1", "--request-timeout", "60",
         "--suppress-health-check", "all", "--no-color"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]


@pytest.mark.parametrize("mode", ["open", "admin"])
def test_no_input_makes_a_server_error_or_breaks_the_schema(make_live_server, tiny_base, tmp_path, mode):
    # A small token limit keeps each generated request quick; the schema states it as a maximum.
    server = make_live_server(tiny_base, max_new_tokens_limit=8, request_timeout_s=60)
    headers = []
    if mode == "admin":
        with server.runtime.sessions() as session:
            _, admin_key = auth.create_key(session, "admin", "fuzz")
        headers = ["-H", f"Authorization: Bearer {admin_key}"]
    schemathesis(f"{server.url}/openapi.json", tmp_path, *headers)


def test_chats_with_a_served_model_make_no_server_error(make_live_server, tiny_base, tmp_path):
    """The walk above mostly names models that do not exist (404): here `model` is the base model's
    name, so every generated chat reaches the template, the tokenizer and the engine."""
    server = make_live_server(tiny_base, max_new_tokens_limit=8, request_timeout_s=60)
    schema = httpx.get(f"{server.url}/openapi.json").json()
    schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"] = {"const": tiny_base.name}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    schemathesis("schema.json", tmp_path, "--url", server.url, "--include-path", "/v1/chat/completions")
