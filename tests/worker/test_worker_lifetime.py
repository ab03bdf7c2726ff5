"""`python -m app.cli run` starts a Celery worker beside the API: the worker (and the pool
process that trains) must end with it, on SIGTERM and on kill -9."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.worker.test_end_to_end import sst2_slice


class Run:
    """`python -m app.cli run` on a free port, the tiny model, the embedded broker."""

    def __init__(self, tmp_path, database_url, model_dir):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        environment = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {
            "DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": database_url,
            "BASE_MODEL": str(model_dir), "QUANTIZATION": "fp32",
        }
        self.log = tmp_path / "run.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--port", str(port)], cwd=REPO,
                                            env=environment, stdout=log, stderr=subprocess.STDOUT)
        self.workers: list[psutil.Process] = []
        wait_until(self.answers, "the API answers")

    def answers(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/health").status_code == 200
        except httpx.TransportError:
            return False

    def find_workers(self) -> list[psutil.Process]:
        """The Celery worker and its pool process (the one that trains), once both exist."""

        def both_up():
            self.workers = psutil.Process(self.process.pid).children(recursive=True)
            return len(self.workers) >= 2

        wait_until(both_up, "the worker and its pool process started")
        return self.workers

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for process in self.workers:  # what outlived it
            if not ended(process):
                process.kill()


@pytest.fixture
def start_run(tmp_path, sqlite_url, tiny_model_dir):
    runs = []

    def _start() -> Run:
        runs.append(Run(tmp_path, sqlite_url, tiny_model_dir))
        return runs[-1]

    yield _start
    for run in runs:
        run.stop()


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # exited; nobody has reaped it yet
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate, what: str, polls: int = 1200):
    for _ in range(polls):  # 0.1 s apart
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"never: {what}")


def test_sigterm_stops_the_worker_with_the_api(start_run):
    run = start_run()
    workers = run.find_workers()
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(timeout=60) == 128 + signal.SIGTERM  # it left through its cleanup, not killed by the signal
    wait_until(lambda: all(ended(p) for p in workers), "the worker ended with the API", polls=600)


def test_kill_9_ends_the_worker_and_its_running_job(start_run):
    run = start_run()
    job_id = httpx.post(f"{run.url}/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                        data={"max_steps": "1000000", "eval_every": "1000000", "num_virtual_tokens": "4"}).json()["id"]
    wait_until(lambda: httpx.get(f"{run.url}/train-jobs/{job_id}").json()["progress"]["step"] >= 1, "the job trains")
    workers = run.find_workers()
    run.process.kill()
    run.process.wait()
    wait_until(lambda: all(ended(p) for p in workers), "the worker and its training ended", polls=600)
