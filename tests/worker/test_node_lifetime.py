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


def post_job(node: Node, max_steps: int, eval_every: int | None = None) -> str:
    """A job of `max_steps` that evaluates every `eval_every` steps (default: at its end only)."""
    response = httpx.post(f"{node.url}/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                          data={"max_steps": str(max_steps), "eval_every": str(eval_every or max_steps),
                                "early_stopping_patience": "1000", "num_virtual_tokens": "4"})
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


def messages(node: Node, job_id: str) -> list[str]:
    return [e["data"].get("message", "") for e in httpx.get(f"{node.url}/train-jobs/{job_id}/events").json()]


def pause(node: Node, seconds: float) -> None:
    """SIGSTOP the whole node for `seconds` (past its 3 s stale timeout), then SIGCONT."""
    node.process.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    node.process.send_signal(signal.SIGCONT)


def test_a_node_paused_past_the_stale_timeout_keeps_its_own_job(start_node):
    """Issue 21, finding 2: after SIGCONT the node's own reaper woke first, found its own job's
    heartbeat stale and failed it (or requeued it, to start again from step 0)."""
    node = start_node()
    job_id = post_job(node, 300, eval_every=20)
    wait_until(lambda: node.job(job_id)["progress"]["step"] >= 5, "the job trains")
    pause(node, 9)
    wait_until(lambda: node.job(job_id)["status"] not in ("queued", "running"), "the job ends", polls=1800)
    job = node.job(job_id)
    assert (job["status"], job["attempts"], job["progress"]["step"]) == ("succeeded", 1, 300), job
    assert not any("stopped responding" in m for m in messages(node, job_id))


def test_a_job_whose_node_is_paused_goes_on_elsewhere_from_its_last_evaluation(start_node):
    first, second = start_node(), start_node()
    job_id = post_job(first, 300, eval_every=20)
    wait_until(lambda: first.job(job_id)["progress"]["step"] >= 25, "the job trains past an evaluation")
    started_on = [m for m in messages(first, job_id) if m.startswith("started on ")]
    paused, other = (first, second) if started_on[0].endswith(f":{first.process.pid}") else (second, first)
    paused.process.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: other.job(job_id)["attempts"] == 2, "the other node takes the job")
    finally:
        paused.process.send_signal(signal.SIGCONT)
    wait_until(lambda: other.job(job_id)["status"] not in ("queued", "running"), "the job ends", polls=1800)
    job = other.job(job_id)
    assert (job["status"], job["attempts"], job["progress"]["step"]) == ("succeeded", 2, 300), job
    resumed = [m for m in messages(other, job_id) if m.startswith("going on from step ")]
    assert len(resumed) == 1 and int(resumed[0].split()[4].rstrip(",")) >= 20, resumed  # not from step 0
    assert httpx.get(f"{other.url}/adapters").json()["total"] == 1  # the paused run, awake again, wrote nothing
    wait_until(lambda: "no longer this run's" in paused.log.read_text(), "the paused run learns it lost the job")
