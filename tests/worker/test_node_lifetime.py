"""`python -m worker.node serve` is one process that serves and trains on one model: SIGTERM gives
its running job back (queued again, no attempt spent), and after kill -9 another node finishes it."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.worker.test_end_to_end import sst2_slice


class Node:
    """`python -m worker.node serve` on a free port, the tiny model, the embedded broker."""

    def __init__(self, tmp_path, database_url, model_dir, name: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        environment = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {
            "DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": database_url,
            "BASE_MODEL": str(model_dir), "QUANTIZATION": "fp32",
            "HEARTBEAT_INTERVAL_S": "0.5", "JOB_STALE_AFTER_S": "3",
        }
        self.log = tmp_path / f"{name}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "worker.node", "serve", "--port", str(port)],
                                            cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.answers, "the API answers")

    def answers(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/health").status_code == 200
        except httpx.TransportError:
            return False

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.url}/train-jobs/{job_id}").json()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_node(tmp_path, sqlite_url, tiny_model_dir):
    nodes = []

    def _start() -> Node:
        nodes.append(Node(tmp_path, sqlite_url, tiny_model_dir, f"node-{len(nodes)}"))
        return nodes[-1]

    yield _start
    for node in nodes:
        node.stop()


def wait_until(predicate, what: str, polls: int = 1200):
    for _ in range(polls):  # 0.1 s apart
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"never: {what}")


def post_job(node: Node, max_steps: int) -> str:
    response = httpx.post(f"{node.url}/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                          data={"max_steps": str(max_steps), "eval_every": "1000000", "num_virtual_tokens": "4"})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_sigterm_gives_the_running_job_back(start_node):
    node = start_node()
    job_id = post_job(node, 1_000_000)
    wait_until(lambda: node.job(job_id)["progress"]["step"] >= 1, "the job trains")
    node.process.send_signal(signal.SIGTERM)
    node.process.wait(timeout=60)
    successor = start_node()  # same registry and broker
    job = successor.job(job_id)
    messages = [e["data"].get("message", "") for e in httpx.get(f"{successor.url}/train-jobs/{job_id}/events").json()]
    assert any("its node stopped" in m and "queued again" in m for m in messages), messages
    wait_until(lambda: successor.job(job_id)["status"] == "running", "the next node takes the job")
    assert successor.job(job_id)["attempts"] == 1  # the stop spent no attempt
    httpx.post(f"{successor.url}/train-jobs/{job_id}/cancel")
    wait_until(lambda: successor.job(job_id)["status"] == "cancelled", "cancel ends it within a step", polls=300)
    assert job["status"] in ("queued", "running")


def test_after_kill_9_another_node_finishes_the_job(start_node):
    first = start_node()
    job_id = post_job(first, 200)
    wait_until(lambda: first.job(job_id)["progress"]["step"] >= 1, "the job trains")
    first.process.kill()  # kill -9 mid-job: no cleanup at all
    first.process.wait()
    second = start_node()
    # Its reaper finds the silent heartbeat, queues the job again and sends it; it trains it.
    wait_until(lambda: second.job(job_id)["status"] == "succeeded", "another node finishes the job", polls=1800)
    job = second.job(job_id)
    assert job["attempts"] == 2 and job["progress"]["step"] == 200 and job["adapter_id"]
    served = httpx.post(f"{second.url}/generate", json={"adapter_id": job["adapter_id"], "prompt": "fine", "max_new_tokens": 2})
    assert served.status_code == 200, served.text
