"""Item 5: paging positions past what the databases' integers hold get a 422 naming the parameter,
and the largest accepted one answers an empty page, on SQLite and PostgreSQL alike.

OFFSET is 64-bit on both (the API stops at 2**62, which JSON Schema can state exactly); job event ids
are an INTEGER column, 32-bit on PostgreSQL.
"""

import pytest

from app import jobs
from app.models import new_id
from tests.conftest import random_soft_prompt, upload_adapter

# (path, parameter, largest accepted value); "events" stands for a job's events.
API_POSITIONS = [("/adapters", "offset", 2**62), ("/train-jobs", "offset", 2**62), ("events", "after", 2**31 - 1)]


def add_job(client) -> str:
    """A queued job straight in the registry, so its events can be paged."""
    job_id = new_id()
    with client.app.state.runtime.sessions() as session:
        jobs.create_job(session, job_id=job_id, name="j", params={}, dataset_path=f"datasets/{job_id}",
                        train_examples=1, validation_examples=0)
    return job_id


def resolve(client, path: str) -> str:
    return f"/train-jobs/{add_job(client)}/events" if path == "events" else path


@pytest.mark.parametrize("path, param, largest", API_POSITIONS, ids=["adapters", "train-jobs", "events"])
def test_api_positions_past_the_database_integers_are_refused(db_client, path, param, largest):
    path = resolve(db_client, path)
    for value in (largest + 1, 2**63, 10**30):
        response = db_client.get(path, params={param: value})
        assert response.status_code == 422, response.text
        error = response.json()["detail"][0]
        assert error["loc"] == ["query", param] and str(largest) in error["msg"]


@pytest.mark.parametrize("path, param, largest", API_POSITIONS, ids=["adapters", "train-jobs", "events"])
def test_the_largest_api_position_is_an_empty_page(db_client, path, param, largest):
    path = resolve(db_client, path)
    response = db_client.get(path, params={param: largest, "limit": 200})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body if path.endswith("/events") else body["items"]) == []


@pytest.mark.parametrize("path", ["/admin/adapters", "/admin/jobs"])
def test_admin_pages_past_64_bits_are_refused(db_client, path):
    response = db_client.get(path, params={"page": 2**63})
    assert response.status_code == 422
    assert "Invalid address: page:" in response.text


@pytest.mark.parametrize("path", ["/admin/adapters", "/admin/jobs"])
@pytest.mark.parametrize("per_page", [20, 100])
def test_the_last_admin_page_that_fits_is_past_the_end(db_client, tiny_base, path, per_page):
    add_job(db_client)
    upload_adapter(db_client, random_soft_prompt(tiny_base, 2, seed=0))
    # The largest page whose rows still start within 64 bits at the largest page size (100).
    last = 2**62 // 100 + 1
    response = db_client.get(path, params={"page": last, "per_page": per_page})
    assert response.status_code == 200, response.text
    assert f"Page {last} is past the end." in response.text
    assert db_client.get(path, params={"page": last + 1, "per_page": per_page}).status_code == 422
