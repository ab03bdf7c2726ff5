"""Serving throughput and latency as a load spreads over more adapters: 1, 100, 1,000, 10,000.

One softserve server (`python -m app.cli api`, the adapter cache at its default size), serve_load's
open-loop load (Poisson arrivals, 75% of requests ask for 4 tokens, 25% for 64, SST-2 reviews in
"Review: {input}\\nSentiment:", streamed through /v1/completions, greedy), once per (N, distribution):
the requests spread over N distinct registered adapters, with Zipf-like popularity (weight 1/k^1.1)
or uniformly. Every pass has adapters of its own (disjoint from the other passes'), so none starts
with adapters cached by an earlier one; the registry holds all of them, written straight into the
server's database as `bench.cold_adapters` does (10,000 take seconds, not an upload each).

The rate puts the engine about `--busy` (70%) busy: stepping that share of the time on the one-adapter
load (from /metrics; with continuous batching a step runs while any row is active). Probes of 30 s
of arrivals find it, starting from a quarter of the requests/s a closed batch of 64 requests of
the same mix completes (`--rate` skips the search). Past that knee latency climbs steeply with the
load: at 0.7x the closed batch's rate the engine steps ~98% of the time, and there a small change
in the work per request (a newcomer computing its own soft prompt) moves p90 by 1.4-1.9x (bench/README.md).
Each pass reports its own busy share and the server's CPU share.
Every pass replays the same arrivals, prompts and lengths; only the adapter each request names differs.
The passes run from N = 1 and then the largest N down, so the passes the targets compare run one
after the other: these machines' speed drifts over minutes (seen: at 2.56 req/s, the one-adapter
pass stepped 64% of the time in one run, 76% and 80% in two others).

Where time goes, per pass, from the server's /metrics counters: registry lookups (count, total
and mean time), adapter loads on cache misses (count, total time), prefix cache hits and misses.

    python -m bench.many_adapters [--counts 1,100,1000,10000] [--distributions zipf,uniform]
        [--requests N] [--rate R | --busy 0.7] [--model FOLDER]

Targets: tok/s at the largest N >= 0.9x N = 1, short p90 <= 1.5x N = 1 (each distribution), and no
failed request. The last stdout line is one JSON object.
"""

import argparse
import asyncio
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from app.adapter_files import content_sha256, encode_adapter
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.engine.loader import model_dir_and_name
from app.models import Adapter, StoredFile
from app.storage import adapter_key
from bench.serve_load import (
    LONG_TOKENS,
    SHORT_SHARE,
    SHORT_TOKENS,
    SST2,
    TEMPLATE,
    VIRTUAL_TOKENS,
    Embeddings,
    Job,
    exit_on_sigterm,
    log,
    open_loop_jobs,
    replay,
    softserve_body,
    start_softserve,
    summarise,
)

PROBE_REQUESTS = 64  # the closed batch that measures full-load requests/s
BUSY_PROBE_S, BUSY_TOLERANCE, BUSY_PROBES = 30.0, 0.05, 5  # the search for the rate that keeps the engine --busy
MIN_REQUESTS, MAX_REQUESTS = 48, 240  # per pass, by default a minute of arrivals: 7 passes fit in 20 minutes
INSERT_BATCH = 250
COUNTERS = {  # /metrics counter -> report key
    "softserve_registry_lookups_total": "registry_lookups",
    "softserve_registry_lookup_seconds_total": "registry_lookup_s",
    "softserve_adapter_cache_misses_total": "adapter_loads",
    "softserve_adapter_load_seconds_total": "adapter_load_s",
    "softserve_prefix_cache_hits_total": "prefix_hits",
    "softserve_prefix_cache_misses_total": "prefix_misses",
    "softserve_engine_steps_total": "engine_steps",
    "softserve_engine_step_seconds_total": "engine_step_s",
}


def register(database_url: str, embeddings: Embeddings, count: int, fingerprint: str, base_name: str,
             seed: int) -> list[str]:
    """`count` prompt-tuning adapters (random vocabulary embeddings, VIRTUAL_TOKENS each), rows and
    files bulk-inserted into the registry. Returns their ids."""
    sessions = make_session_factory(engine := make_engine(database_url))
    ids = [f"many{i:08x}" for i in range(count)]
    generator = torch.Generator().manual_seed(seed)
    vocab = embeddings.embed.num_embeddings
    for start in range(0, count, INSERT_BATCH):
        adapters, files = [], []
        with torch.inference_mode():
            for adapter_id in ids[start:start + INSERT_BATCH]:
                prompt = embeddings.embed(torch.randint(0, vocab, (VIRTUAL_TOKENS,), generator=generator))
                encoded = encode_adapter(prompt, fingerprint, base_name)
                adapters.append(dict(id=adapter_id, name=adapter_id, base_fingerprint=fingerprint,
                                     num_virtual_tokens=VIRTUAL_TOKENS, sha256=content_sha256(prompt),
                                     size_bytes=sum(map(len, encoded.values())), source="imported", metrics={}))
                files += [dict(key=adapter_key(adapter_id), name=name, data=data) for name, data in encoded.items()]
        with sessions() as session, session.begin():
            session.execute(insert(Adapter), adapters)
            session.execute(insert(StoredFile), files)
    engine.dispose()
    return ids


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    found = {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}
    return {key: found.get(name, 0.0) for name, key in COUNTERS.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pass(server, body, jobs: list[Job]) -> dict:
    before, cpu_before = counters(server.url), cpu_seconds(server.process.pid)
    outcomes = asyncio.run(replay(server.url + "/v1/completions", [body(job) for job in jobs], jobs))
    after, cpu = counters(server.url), cpu_seconds(server.process.pid) - cpu_before
    figures = summarise(outcomes)
    moved = {key: after[key] - before[key] for key in after}
    lookups, loads = moved["registry_lookups"], moved["adapter_loads"]
    figures["engine_busy_share"] = round(moved["engine_step_s"] / figures["makespan_s"], 3)
    figures["server_cpu_share"] = round(cpu / (figures["makespan_s"] * len(os.sched_getaffinity(0))), 3)
    figures["distinct_adapters"] = len({job.adapter for job in jobs})
    figures["where_time_goes"] = {
        "registry_lookups": int(lookups), "registry_lookup_total_s": round(moved["registry_lookup_s"], 4),
        "registry_lookup_mean_ms": round(1000 * moved["registry_lookup_s"] / lookups, 3) if lookups else None,
        "adapter_loads": int(loads), "adapter_load_total_s": round(moved["adapter_load_s"], 4),
        "adapter_load_mean_ms": round(1000 * moved["adapter_load_s"] / loads, 3) if loads else None,
        "prefix_hits": int(moved["prefix_hits"]), "prefix_misses": int(moved["prefix_misses"]),
        "engine_steps": int(moved["engine_steps"]),
    }
    return figures


def full_load_rate(server, body, prompt, generator: torch.Generator, adapters: int) -> float:
    """Requests/s a closed batch of the open loop's mix completes, all sent at once."""
    jobs = [Job(0.0, i % adapters, prompt(), SHORT_TOKENS if i < PROBE_REQUESTS * SHORT_SHARE else LONG_TOKENS)
            for i in range(PROBE_REQUESTS)]
    asyncio.run(replay(server.url + "/v1/completions", [body(job) for job in jobs[:4]], jobs[:4]))  # warm
    figures = summarise(asyncio.run(replay(server.url + "/v1/completions", [body(job) for job in jobs], jobs)))
    log(f"  closed batch of {PROBE_REQUESTS}: {json.dumps(figures)}")
    return PROBE_REQUESTS / figures["makespan_s"]


def rate_for_busy_share(busy_share_at: Callable[[float], float], start: float, target: float
                        ) -> tuple[float, list[tuple[float, float]]]:
    """The arrival rate at which the engine steps `target` of the time, and every (rate, share)
    probed: `busy_share_at(rate)` measures one. The share grows with the rate, never faster
    (rows that overlap share steps) and slower towards saturation, so each next rate follows the
    slope of log share over log rate between the last two probes (at least 0.2; 1 at first, and
    where noise made the share fall as the rate rose or rise as it fell). Returns the probed rate
    whose share came nearest."""
    probes: list[tuple[float, float]] = []
    rate = start
    for _ in range(BUSY_PROBES):
        share = max(busy_share_at(rate), 1e-3)
        probes.append((rate, share))
        if abs(share - target) <= BUSY_TOLERANCE:
            break
        slope = 1.0  # proportional: at first, and where noise moved the share against the rate
        if len(probes) > 1 and probes[-2][0] != rate:
            measured = math.log(share / probes[-2][1]) / math.log(rate / probes[-2][0])
            if measured >= 0:
                slope = min(max(measured, 0.2), 1.0)
        rate *= (target / share) ** (1 / slope)
    return min(probes, key=lambda probe: abs(probe[1] - target))[0], probes


def popularity(count: int, distribution: str) -> torch.Tensor:
    if distribution == "zipf":
        return 1.0 / torch.arange(1, count + 1, dtype=torch.float64) ** 1.1
    return torch.ones(count, dtype=torch.float64)


def targets_of(passes: dict[str, dict], largest: int, distributions: list[str]) -> dict:
    one = passes["n1"]
    targets = {}
    for distribution in distributions:
        name = f"n{largest}_{distribution}"
        if name not in passes or largest == 1:
            continue
        mine = passes[name]
        targets[f"{name}_tok_s_at_least_0.9x_n1"] = {
            "value": round(mine["tok_s"] / one["tok_s"], 3), "target": ">= 0.9",
            "met": mine["tok_s"] >= 0.9 * one["tok_s"]}
        ratio = mine["short_p90_s"] / one["short_p90_s"] if mine["short_p90_s"] and one["short_p90_s"] else None
        targets[f"{name}_short_p90_at_most_1.5x_n1"] = {
            "value": round(ratio, 3) if ratio is not None else None, "target": "<= 1.5",
            "met": ratio is not None and ratio <= 1.5}
    failed = sum(p["failed"] for p in passes.values())
    targets["no_failed_request"] = {"value": failed, "target": "== 0", "met": failed == 0}
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,100,1000,10000", help="distinct adapters the load spreads over")
    parser.add_argument("--distributions", default="zipf,uniform", help="zipf, uniform or both")
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests per pass (default: a minute of arrivals, {MIN_REQUESTS} to {MAX_REQUESTS})")
    parser.add_argument("--rate", type=float, default=None, help="arrivals per second (default: from --busy)")
    parser.add_argument("--busy", type=float, default=0.7, help="share of the time the engine should be stepping"
                        " on the one-adapter load (the rate is searched for)")
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model folder (default: BASE_MODEL"
                        " or the default model)")
    parser.add_argument("--port", type=int, default=8941)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    distributions = args.distributions.split(",")
    if counts[0] != 1 or set(distributions) - {"zipf", "uniform"}:
        parser.error("--counts must include 1 (the baseline); --distributions: zipf, uniform")
    exit_on_sigterm()
    started = time.perf_counter()
    settings = Settings()
    model_dir = args.model or model_dir_and_name(settings.base_model, settings.model_cache_dir)[0]
    embeddings = Embeddings(model_dir, args.seed)
    # one adapter: no distribution; then the targets' passes next to it
    plan = [(1, "zipf")] + [(n, d) for n in reversed(counts[1:]) for d in distributions]
    phrases = [json.loads(line)["input"] for line in SST2.read_text().splitlines()]
    generator = torch.Generator().manual_seed(args.seed)

    def prompt(_adapter: int = 0) -> str:
        return TEMPLATE.format(input=phrases[int(torch.randint(len(phrases), (1,), generator=generator))])

    passes: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="many-adapters-") as tmp:
        server, probe_ids = start_softserve("softserve", Path(tmp), args.port, settings.prefix_cache_tokens, embeddings,
                                            model_dir=model_dir)
        try:
            health = httpx.get(server.url + "/health").json()
            base_name = health["base_model"]
            registered = time.perf_counter()
            total = sum(n for n, _ in plan)
            ids = register(f"sqlite:///{Path(tmp) / 'softserve' / 'softserve.db'}", embeddings, total,
                           health["fingerprint"], base_name, args.seed)
            registered = time.perf_counter() - registered
            log(f"registered {total} adapters in {registered:.1f} s")
            probes: list[tuple[float, float]] = []
            if args.rate:
                rate = args.rate
            else:
                full = full_load_rate(server, softserve_body(probe_ids, base_name), prompt, generator, len(probe_ids))

                def busy_share_at(offered: float) -> float:
                    jobs = open_loop_jobs(offered, max(MIN_REQUESTS // 2, round(BUSY_PROBE_S * offered)),
                                          popularity(1, "zipf"), prompt, generator)
                    share = run_pass(server, softserve_body(probe_ids[:1], base_name), jobs)["engine_busy_share"]
                    log(f"  {offered:.2f} req/s: the engine stepped {share:.0%} of the time")
                    return share

                rate, probes = rate_for_busy_share(busy_share_at, full / 4, args.busy)
            requests = args.requests or max(MIN_REQUESTS, min(MAX_REQUESTS, round(60 * rate)))
            log(f"offering {rate:.2f} req/s, {requests} requests a pass")
            # every pass the same arrivals, prompts and lengths: only which adapter each request names differs
            load = open_loop_jobs(rate, requests, popularity(1, "zipf"), prompt, generator)
            offset = 0
            for count, distribution in plan:
                name = "n1" if count == 1 else f"n{count}_{distribution}"
                own = ids[offset:offset + count]
                offset += count
                drawn = torch.multinomial(popularity(count, distribution), len(load), replacement=True,
                                          generator=generator).tolist()
                jobs = [replace(job, adapter=adapter) for job, adapter in zip(load, drawn)]
                passes[name] = run_pass(server, softserve_body(own, base_name), jobs)
                log(f"  {name}: {json.dumps(passes[name])}")
            final = httpx.get(server.url + "/health").json()["adapter_cache"]
        finally:
            server.stop()
    targets = targets_of(passes, counts[-1], distributions)
    print(json.dumps({
        "model": str(model_dir), "rate_req_s": round(rate, 3), "requests_per_pass": requests,
        "busy_probes": [{"rate_req_s": round(r, 3), "engine_busy_share": share} for r, share in probes],
        "registered_adapters": total + len(probe_ids), "register_s": round(registered, 1),
        "adapter_cache_capacity": final["capacity"], **passes, "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values()),
        "total_runtime_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
