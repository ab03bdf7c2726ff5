"""Memory of one node that serves and trains (`make run`'s shape: `python -m worker.node serve`,
the default int8 model, SQLite and the embedded broker), serving idle and at peak while a job
trains on the bundled SST-2 sample.

Memory is the resident memory (RSS) summed over every process of the node, sampled every 0.1 s;
on CUDA, the GPU memory nvidia-smi reports for those processes (allocations plus each process's
context). Before this design the API and a Celery worker each held a model copy (figures:
bench/README.md).

    python -m bench.node_memory [--steps 40]

Last stdout line: JSON with idle_mb, training_peak_mb, node_training_vs_idle (target <= 1.3).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.serve_load import REPO, TEMPLATE, Server, log

SAMPLE = REPO / "examples" / "sst2"
TARGET = 1.3


def node_memory_mb(root: psutil.Process, cuda: bool) -> float:
    processes = [root, *root.children(recursive=True)]
    if cuda:
        pids = {p.pid for p in processes}
        rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
        return float(sum(int(used) for pid, used in (row.split(", ") for row in rows) if int(pid) in pids))
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def start_node(work: Path, port: int) -> Server:
    env = {"DATA_DIR": str(work), "DATABASE_URL": f"sqlite:///{work / 'softserve.db'}"}
    env = {k: v for k, v in (os.environ | env).items() if k != "REDIS_URL"}  # the embedded broker
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], env=env, cwd=REPO, check=True,
                   capture_output=True)
    node = Server("node", [sys.executable, "-m", "worker.node", "serve", "--port", str(port)], env, port,
                  work / "node.log")
    node.wait_ready(600)
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--port", type=int, default=8932)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="node-memory-") as tmp:
        node = start_node(Path(tmp), args.port)
        try:
            health = httpx.get(node.url + "/health").json()
            cuda = health["device"].startswith("cuda")
            root = psutil.Process(node.process.pid)
            for prompt in ("Review: a fine film\nSentiment:", "Once upon a time"):  # serving's buffers exist
                httpx.post(node.url + "/generate", json={"prompt": prompt, "max_new_tokens": 16}, timeout=120).raise_for_status()
            idle = 0.0
            for _ in range(30):
                idle = max(idle, node_memory_mb(root, cuda))
                time.sleep(0.1)
            log(f"serving idle: {idle:.0f} MB; training {args.steps} steps on {SAMPLE}")
            files = {"file": ("train.jsonl", (SAMPLE / "train.jsonl").read_bytes()),
                     "validation_file": ("validation.jsonl", (SAMPLE / "validation.jsonl").read_bytes())}
            data = {"name": "node-memory", "max_steps": str(args.steps), "eval_every": str(max(1, args.steps // 2)),
                    "template": TEMPLATE}
            job = httpx.post(node.url + "/train-jobs", files=files, data=data, timeout=60).json()
            peak, started = idle, time.perf_counter()
            while True:
                peak = max(peak, node_memory_mb(root, cuda))
                state = httpx.get(f"{node.url}/train-jobs/{job['id']}").json()
                if state["status"] not in ("queued", "running"):
                    break
                time.sleep(0.1)
            log(f"job {state['status']} after {time.perf_counter() - started:.0f} s; peak {peak:.0f} MB")
        finally:
            node.stop()
    print(json.dumps({
        "model": health["base_model"], "quantization": health["quantization"], "device": health["device"],
        "job_status": state["status"], "job_steps": state["progress"]["step"],
        "job_seconds": round(time.perf_counter() - started, 1),
        "idle_mb": round(idle, 1), "training_peak_mb": round(peak, 1),
        "node_training_vs_idle": round(peak / idle, 3), "target": TARGET, "target_met": peak / idle <= TARGET,
    }))


if __name__ == "__main__":
    main()
