"""Scale-out, for real: two API processes (`python -m app.cli api`) and a training process
(`python -m worker.node train`), each with its own empty DATA_DIR, share only PostgreSQL and Redis
(and, with the directory backend, one folder). Whatever one node stores, every other node reads."""

import io
import os
import signal
import socket
import subprocess
import sys
import zipfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis
from safetensors.torch import load as load_safetensors

from app.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import REPO
from tests.worker.test_end_to_end import sst2_slice
from tests.worker.test_node_lifetime import wait_until


class NodeProcess:
    """One node: its own DATA_DIR (empty), the shared settings, a log file."""

    def __init__(self, name: str, folder: Path, shared_env: dict, command: list[str]):
        self.data_dir = folder / f"data-{name}"
        self.log = folder / f"{name}.log"
        environment = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "STORAGE", "STORAGE_DIR")}
        environment |= shared_env | {"DATA_DIR": str(self.data_dir)}
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, *command], cwd=REPO, env=environment, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> None:
        assert self.process.poll() is None, self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class ApiNode(NodeProcess):
    def __init__(self, name: str, folder: Path, shared_env: dict):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        super().__init__(name, folder, shared_env, ["-m", "app.cli", "api", "--port", str(port)])
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)  # open mode: no keys, loopback

    def answers(self) -> bool:
        self.alive()
        try:
            return self.http.get("/health").status_code == 200
        except httpx.TransportError:
            return False


def zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.parametrize("backend", ["database", "directory"])
def test_every_node_serves_downloads_and_deletes_what_another_node_made(backend, tmp_path, postgres_url, redis_url,
                                                                        tiny_model_dir):
    redis.Redis.from_url(redis_url).flushdb()
    shared_folder = tmp_path / "shared"
    shared_env = {"DATABASE_URL": postgres_url, "REDIS_URL": redis_url, "BASE_MODEL": str(tiny_model_dir),
                  "QUANTIZATION": "fp32", "STORAGE": backend, "HEARTBEAT_INTERVAL_S": "0.5", "JOB_STALE_AFTER_S": "30"}
    if backend == "directory":
        shared_env["STORAGE_DIR"] = str(shared_folder)
    with ExitStack() as stack:
        a, b = (ApiNode(name, tmp_path, shared_env) for name in ("api-a", "api-b"))
        worker = NodeProcess("worker", tmp_path, shared_env, ["-m", "worker.node", "train"])
        for node in (a, b, worker):
            stack.callback(node.stop)
        wait_until(a.answers, "API A answers")
        wait_until(b.answers, "API B answers")

        # A takes the upload; the worker, which never saw A's disk, trains it.
        created = a.http.post("/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                              data={"max_steps": "4", "eval_every": "4", "num_virtual_tokens": "4"})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]

        def succeeded() -> bool:
            worker.alive()
            job = b.http.get(f"/train-jobs/{job_id}").json()
            assert job["status"] not in ("failed", "cancelled"), job
            return job["status"] == "succeeded"

        wait_until(succeeded, "the worker trains the job uploaded to A", polls=3000)
        adapter_id = b.http.get(f"/train-jobs/{job_id}").json()["adapter_id"]

        # B serves it, greedily, exactly as A does.
        body = {"adapter_id": adapter_id, "prompt": "a fine film", "max_new_tokens": 8, "temperature": 0}
        served_b, served_a = b.http.post("/generate", json=body), a.http.post("/generate", json=body)
        assert served_b.status_code == 200, served_b.text
        assert served_b.json()["text"] == served_a.json()["text"]

        # B downloads it as PEFT files, the same A gives.
        download_b = b.http.get(f"/adapters/{adapter_id}/download")
        assert download_b.status_code == 200 and download_b.headers["content-type"] == "application/zip"
        files = zip_members(download_b.content)
        assert set(files) == {CONFIG_NAME, WEIGHTS_NAME}
        assert files == zip_members(a.http.get(f"/adapters/{adapter_id}/download").content)
        assert load_safetensors(files[WEIGHTS_NAME])["prompt_embeddings"].shape[0] == 4

        # A deletes it; B stops serving it at its next request.
        assert a.http.delete(f"/adapters/{adapter_id}").status_code == 204
        assert b.http.post("/generate", json=body).status_code == 404
        assert b.http.get(f"/adapters/{adapter_id}/download").status_code == 404

        # No node's own folder holds an adapter or a dataset: only the shared storage does.
        for node in (a, b, worker):
            assert not {"adapters", "datasets"} & {path.name for path in node.data_dir.iterdir()}, node.data_dir
        if backend == "directory":
            assert not (shared_folder / "adapters" / adapter_id).exists()
            assert (shared_folder / "datasets").is_dir()
