"""Serving while a job trains on the same node and model, against serving idle.

One node (`python -m worker.node serve`, the default int8 model, 32 adapters as in bench.serve_load)
gets bench.serve_load's open-loop load at 1 req/s (48 requests, 75% 4 tokens / 25% 64, Zipf-like
adapter popularity): once idle, then while a prompt-tuning job trains on the bundled SST-2
sample with the default hyperparameters. Training speed is measured three ways, in steps per minute:
  idle_node   the job's progress while nothing else runs on the node
  busy_node   the job's progress while the load runs (serving has priority)
  bare_loop   the training loop alone in a fresh process, as bench.train_quality runs it (same
              config and data, no engine), before the node starts and after it stops (the mean:
              the machine's speed drifts)

    python -m bench.serve_while_training [--window-s 90]

Last stdout line: JSON with short_p90_s_idle, short_p90_s_training, ttft_p50_s_idle,
ttft_p50_s_training, train_steps_per_min_{idle_node,busy_node,bare_loop} and the targets:
short p90 while training <= 1.5x idle; idle-node training >= 0.9x the bare loop.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serve_load import (
    ADAPTERS,
    PREFIX_CACHE_TOKENS,
    REPO,
    TEMPLATE,
    Embeddings,
    build_scenarios,
    log,
    replay,
    softserve_body,
    start_softserve,
    summarise,
)

SAMPLE = REPO / "examples" / "sst2" / "train.jsonl"
RATE = 1.0


def steps_per_minute(url: str, job_id: str, seconds: float, during=None) -> float:
    """The job's steps over `seconds` (or over `during()`, a blocking call, when given)."""
    def step() -> tuple[int, float]:
        return httpx.get(f"{url}/train-jobs/{job_id}").json()["progress"]["step"], time.perf_counter()

    first, start = step()
    if during is None:
        time.sleep(seconds)
    else:
        during()
    last, end = step()
    return round((last - first) / (end - start) * 60, 2)


def bare_loop(steps: int) -> float:
    """Steps per minute of the training loop alone (this module, in a fresh process)."""
    done = subprocess.run([sys.executable, "-m", "bench.serve_while_training", "--bare-loop", str(steps)],
                          cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["steps_per_min"]


def run_bare_loop(steps: int) -> None:
    from app.config import Settings
    from app.datasets import read_jsonl
    from app.engine.loader import load_base_model
    from app.train_config import TrainConfig
    from worker.training import Hooks, train_adapter

    settings = Settings()
    base = load_base_model(settings.base_model, settings.model_cache_dir, settings.quantization, settings.device,
                           settings.llm_int8_threshold, settings.int8_packed_weights)
    times: list[float] = []
    config = TrainConfig(template=TEMPLATE, max_steps=steps + 1, eval_every=1_000_000)
    train_adapter(base, config, read_jsonl(SAMPLE), None, Hooks(on_step=lambda *_: times.append(time.perf_counter())))
    # From the end of the first step (its one-off costs excluded) to the end of the last one.
    print(json.dumps({"steps_per_min": round((len(times) - 1) / (times[-1] - times[0]) * 60, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-s", type=float, default=90.0, help="how long the idle node's training is timed")
    parser.add_argument("--bare-steps", type=int, default=20, help="steps the bare loop is timed over, each time")
    parser.add_argument("--port", type=int, default=8933)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bare-loop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_loop:
        run_bare_loop(args.bare_loop)
        return
    from app.config import Settings
    from app.engine.loader import model_dir_and_name

    settings = Settings()
    model_dir = model_dir_and_name(settings.base_model, settings.model_cache_dir)[0]
    jobs = build_scenarios([RATE], args.seed, [""] * ADAPTERS)[f"rate_{RATE:g}"]
    embeddings = Embeddings(model_dir, args.seed)
    log(f"the bare training loop, {args.bare_steps} steps...")
    bare_before = bare_loop(args.bare_steps)
    with tempfile.TemporaryDirectory(prefix="serve-while-training-") as tmp:
        node, adapter_ids = start_softserve("node", Path(tmp), args.port, PREFIX_CACHE_TOKENS, embeddings,
                                            module=("worker.node", "serve"))
        try:
            url = node.url
            body = softserve_body(adapter_ids, httpx.get(url + "/health").json()["base_model"])
            load = lambda: summarise(asyncio.run(replay(url + "/v1/completions", [body(j) for j in jobs], jobs)))  # noqa: E731
            asyncio.run(replay(url + "/v1/completions", [body(j, warm=True) for j in jobs[:2]], jobs[:2]))
            log("load on the idle node...")
            idle = load()
            log(f"  idle: {json.dumps(idle)}")
            job = httpx.post(url + "/train-jobs", files={"file": ("train.jsonl", SAMPLE.read_bytes())},
                             data={"name": "bench", "template": TEMPLATE, "max_steps": "1000000",
                                   "eval_every": "1000000"}, timeout=60).json()
            while httpx.get(f"{url}/train-jobs/{job['id']}").json()["progress"]["step"] < 2:
                time.sleep(0.5)
            log(f"job {job['id']} training; timing it alone for {args.window_s:.0f} s...")
            idle_node = steps_per_minute(url, job["id"], args.window_s)
            log(f"  idle node: {idle_node} steps/min; now the load again, while it trains...")
            during: dict = {}
            busy_node = steps_per_minute(url, job["id"], 0, during=lambda: during.update(load()))
            log(f"  while training: {json.dumps(during)}; busy node: {busy_node} steps/min")
            httpx.post(f"{url}/train-jobs/{job['id']}/cancel")
        finally:
            node.stop()
    log(f"the bare training loop again, {args.bare_steps} steps...")
    bare_after = bare_loop(args.bare_steps)
    bare = (bare_before + bare_after) / 2
    short_ratio = during["short_p90_s"] / idle["short_p90_s"]
    print(json.dumps({
        "rate_req_s": RATE, "requests": len(jobs),
        "short_p90_s_idle": idle["short_p90_s"], "short_p90_s_training": during["short_p90_s"],
        "ttft_p50_s_idle": idle["ttft_p50_s"], "ttft_p50_s_training": during["ttft_p50_s"],
        "short_p50_s_idle": idle["short_p50_s"], "short_p50_s_training": during["short_p50_s"],
        "failed_idle": idle["failed"], "failed_training": during["failed"],
        "train_steps_per_min_idle_node": idle_node, "train_steps_per_min_busy_node": busy_node,
        "train_steps_per_min_bare_loop": round(bare, 2), "bare_loop_before_and_after": [bare_before, bare_after],
        "short_p90_training_vs_idle": round(short_ratio, 3), "idle_node_vs_bare_loop": round(idle_node / bare, 3),
        "targets": {"short_p90_training_at_most_1.5x_idle": short_ratio <= 1.5,
                    "idle_node_training_at_least_0.9x_bare_loop": idle_node / bare >= 0.9},
    }))


if __name__ == "__main__":
    main()
