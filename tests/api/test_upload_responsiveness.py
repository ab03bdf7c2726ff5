"""Issue 21, finding 6: while a 50 MiB dataset is read, checked and stored, the node's event loop
keeps answering (/health within 100 ms, bar one scheduling hiccup on a 2-core machine): every step
of POST /train-jobs after the upload itself runs in worker threads or a process of its own. The
node is its own process, as `make run` starts it. Reading that dataset on the loop held it for
seconds (1.48 s answers were seen), far past the 0.5 s that any single answer may take here."""

import gc
import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.worker.test_node_lifetime import Node

MIB = 1 << 20


@pytest.fixture
def node(tmp_path, sqlite_url, tiny_model_dir):
    node = Node(tmp_path, sqlite_url, tiny_model_dir, "node")
    yield node
    node.stop()


def dataset(size: int) -> bytes:
    row = json.dumps({"input": "a long and winding review of a film " * 7, "output": "positive"}).encode() + b"\n"
    return row * (size // len(row))


# The upload comes from a process of its own, so that only the node is measured; it says when the
# last byte of the body is sent, and the answer once it comes.
UPLOAD = """
import sys, httpx
data = open(sys.argv[2], "rb").read()
boundary = b"softserve-test-boundary"
head = (b"--" + boundary + b'\\r\\nContent-Disposition: form-data; name="max_steps"\\r\\n\\r\\n1\\r\\n'
        b"--" + boundary + b'\\r\\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\\r\\n\\r\\n')
def body():
    yield head
    for start in range(0, len(data), 1 << 20):
        yield data[start : start + (1 << 20)]
    yield b"\\r\\n--" + boundary + b"--\\r\\n"
    print("sent", flush=True)
response = httpx.post(sys.argv[1] + "/train-jobs", content=body(), timeout=600,
                      headers={"content-type": "multipart/form-data; boundary=" + boundary.decode()})
print(response.status_code, response.text[:300], flush=True)
"""


def test_health_answers_within_100_ms_while_a_50_mib_dataset_is_parsed(node, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(dataset(50 * MIB - 64 * 1024))
    uploading = subprocess.Popen([sys.executable, "-c", UPLOAD, node.url, str(path)], stdout=subprocess.PIPE, text=True)
    assert uploading.stdout.readline() == "sent\n"
    latencies = []
    gc.freeze()  # this test process holds millions of objects: its own full collection would be timed too
    try:
        with httpx.Client(base_url=node.url) as http:
            while uploading.poll() is None:
                started = time.perf_counter()
                assert http.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
    finally:
        gc.unfreeze()
    assert uploading.stdout.read().startswith("202 ")
    assert len(latencies) >= 20  # the dataset was being read, checked and stored all along
    slowest = sorted(latencies)[-5:]
    # The full suite once saw one 0.18 s answer (the first, as the upload ended) among 4-70 ms ones.
    assert slowest[-2] < 0.1 and slowest[-1] < 0.5, slowest
