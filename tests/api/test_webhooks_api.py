"""Webhooks through the real app: a job's end reaches a real HTTP listener, signed, from the node's
own delivery loop, and GET /train-jobs/{id}/webhooks shows the delivery."""

import base64
import json
import time

import pytest
from openai import OpenAI
from standardwebhooks import Webhook

from tests.api.test_train_jobs_api import GOOD
from tests.webhook_listener import Listener

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def listener():
    with Listener() as listener:
        yield listener


def test_a_cancelled_job_is_announced_to_webhook_url_and_shown_on_the_job(make_client, tiny_base, listener):
    client = make_client(tiny_base, webhook_url=listener.url, webhook_secret=SECRET)
    job_id = client.post("/train-jobs", files={"file": ("train.jsonl", GOOD)}).json()["id"]
    assert client.get(f"/train-jobs/{job_id}/webhooks").json() == []
    assert client.post(f"/train-jobs/{job_id}/cancel").json()["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while not listener.received and time.monotonic() < deadline:
        time.sleep(0.05)
    [received] = listener.received
    event = Webhook(SECRET).verify(received.body, received.headers)
    assert (event["type"], event["data"]) == ("fine_tuning.job.cancelled", {"id": job_id})
    # ...and as OpenAI's client checks and reads its own webhooks.
    unwrapped = OpenAI(api_key="unused", webhook_secret=SECRET).webhooks.unwrap(received.body, received.headers)
    assert (unwrapped.type, unwrapped.data.id, unwrapped.id) == ("fine_tuning.job.cancelled", job_id, event["id"])
    deadline = time.monotonic() + 10
    while (deliveries := client.get(f"/train-jobs/{job_id}/webhooks").json())[0]["status"] == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [delivery] = deliveries
    assert delivery["id"] == received.headers["webhook-id"] and delivery["event_type"] == "fine_tuning.job.cancelled"
    # The target's path and query (here a token) are not shown.
    target = f"http://127.0.0.1:{listener.port}"
    assert (delivery["url"], delivery["status"], delivery["attempts"]) == (target, "delivered", 1)
    messages = [e["data"]["message"] for e in client.get(f"/train-jobs/{job_id}/events").json()]
    assert messages[-1] == f"webhook fine_tuning.job.cancelled to {target} delivered (HTTP 200, attempt 1)"
    assert "token=abc" not in json.dumps(messages)


def test_webhooks_of_an_unknown_job_404(make_client, tiny_base):
    assert make_client(tiny_base).get("/train-jobs/nope/webhooks").status_code == 404
