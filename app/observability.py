"""Operations: Prometheus metrics and request logs.

Each node has its own registry (`Metrics`, on the Runtime): what it serves is counted where it is
served, and a job's duration on the node that ran it. Engine, cache and job-count figures are read
when /metrics is scraped, from the objects that keep them. `RequestObserver` (ASGI middleware) gives
every HTTP request an id (`X-Request-ID`, taken from the client when it sends a sane one), counts
and times it per route and, for completions, per adapter, and logs one line for it; with
`LOG_FORMAT=json` every log line is a JSON object, a request's with its fields.
"""

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("softserve.requests")

ADAPTER_LABELS = 32  # adapters with a label of their own; the rest count as "other"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class RequestInfo:
    """What a request's handlers tell the middleware about it."""

    request_id: str
    adapter_id: str | None = None


_current: ContextVar[RequestInfo | None] = ContextVar("softserve_request", default=None)


def current_request_id() -> str | None:
    info = _current.get()
    return info.request_id if info is not None else None


def note_adapter(adapter_id: str | None) -> None:
    """Called by the routes that serve an adapter: its id goes on the request's metrics and log line."""
    info = _current.get()
    if info is not None:
        info.adapter_id = adapter_id


class AdapterLabels:
    """A bounded label set: the first ADAPTER_LABELS adapters seen keep their id, the rest share
    "other", so a registry of thousands of adapters cannot blow up the series count."""

    def __init__(self, limit: int = ADAPTER_LABELS):
        self.limit, self._named = limit, set()

    def __call__(self, adapter_id: str | None) -> str:
        if adapter_id is None:
            return "base"
        if adapter_id in self._named or len(self._named) < self.limit:
            self._named.add(adapter_id)
            return adapter_id
        return "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter("softserve_http_requests", "HTTP requests answered",
                                     ["method", "route", "status"], registry=self.registry)
        self.http_duration = Histogram("softserve_http_request_duration_seconds", "HTTP request latency",
                                       ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.adapter_requests = Counter("softserve_adapter_requests", "Completion requests per adapter",
                                        ["adapter", "status"], registry=self.registry)
        self.adapter_duration = Histogram("softserve_adapter_request_duration_seconds",
                                          "Completion request latency per adapter", ["adapter"],
                                          buckets=LATENCY_BUCKETS, registry=self.registry)
        self.job_duration = Histogram("softserve_job_duration_seconds", "Training runs ended on this node",
                                      ["status"], buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 21600),
                                      registry=self.registry)
        self.adapter_label = AdapterLabels()

    def watch(self, read: Callable[[], Iterable]) -> None:
        """Add figures read at scrape time: `read` yields metric families."""
        self.registry.register(_Reader(read))


class _Reader(Collector):
    def __init__(self, read: Callable[[], Iterable]):
        self._read = read

    def collect(self):
        yield from self._read()


def runtime_families(engine_stats: dict, cache_stats: dict, job_counts: dict[str, int]) -> Iterable:
    """The engine's, the adapter cache's and the registry's figures as metric families. `cache_stats`:
    the adapter cache's and the resolver's (its registry lookups)."""
    kv, prefix = engine_stats["kv_cache"], engine_stats["prefix_cache"]

    def gauge(name, doc, value):
        return GaugeMetricFamily(name, doc, value=value)

    def counter(name, doc, value):
        return CounterMetricFamily(name, doc, value=value)

    yield counter("softserve_tokens_generated", "Tokens generated", engine_stats["tokens_generated"])
    yield counter("softserve_engine_steps", "Engine steps (forward passes)", engine_stats["steps"])
    yield counter("softserve_engine_rows_stepped", "Rows summed over engine steps (over steps: the mean batch size)",
                  engine_stats["rows_stepped"])
    yield counter("softserve_engine_step_seconds", "Wall time in engine steps (its rate: the share of time the engine steps)",
                  engine_stats["step_seconds"])
    yield gauge("softserve_engine_running_rows", "Rows in the running batch (the batch size now)", engine_stats["running"])
    yield gauge("softserve_engine_queue_depth", "Requests waiting for admission", engine_stats["queue_depth"])
    yield counter("softserve_engine_faults", "Engine faults healed (failed steps no single row explained)",
                  engine_stats["faults"])
    yield gauge("softserve_engine_healthy", "1 while the engine can serve, 0 once it cannot (see /health)",
                engine_stats["healthy"])
    yield counter("softserve_engine_training_items", "Training work items run by the engine", engine_stats["training_items"])
    yield gauge("softserve_kv_cache_capacity_tokens", "KV cache positions", kv["capacity_tokens"])
    yield gauge("softserve_kv_cache_used_tokens", "KV cache positions held", kv["used_tokens"])
    yield gauge("softserve_kv_cache_reserved_tokens", "KV cache positions promised to running rows", kv["reserved_tokens"])
    yield gauge("softserve_prefix_cache_tokens", "Positions held by adapter prefixes", prefix["tokens"])
    yield counter("softserve_prefix_cache_hits", "Rows that started from a cached prefix", prefix["hits"])
    yield counter("softserve_prefix_cache_misses", "Rows that found no cached prefix", prefix["misses"])
    yield gauge("softserve_adapter_cache_entries", "Adapters resident on the device", cache_stats["size"])
    yield counter("softserve_adapter_cache_hits", "Adapter lookups served from the cache", cache_stats["hits"])
    yield counter("softserve_adapter_cache_misses", "Adapter lookups that loaded weights", cache_stats["misses"])
    yield counter("softserve_adapter_load_seconds", "Time spent loading adapters on cache misses", cache_stats["load_seconds"])
    yield counter("softserve_registry_lookups", "Registry lookups of adapters (one per request)", cache_stats["lookups"])
    yield counter("softserve_registry_lookup_seconds", "Time spent in registry lookups of adapters",
                  cache_stats["lookup_seconds"])
    for name, stats in (("prefix", prefix), ("adapter", cache_stats)):
        if stats.get("hit_rate") is not None:
            yield gauge(f"softserve_{name}_cache_hit_ratio", f"{name} cache hits / lookups so far", stats["hit_rate"])
    plan = engine_stats.get("memory_plan")
    if plan is not None:
        parts = GaugeMetricFamily("softserve_memory_plan_bytes", "How the memory plan splits the node's memory",
                                  labels=["part"])
        for part in ("total", "weights", "activation_reserve", "kv_cache", "free"):
            parts.add_metric([part], plan[f"{part}_bytes"])
        yield parts
    jobs = GaugeMetricFamily("softserve_jobs", "Training jobs in the registry, by status", labels=["status"])
    for status, count in sorted(job_counts.items()):
        jobs.add_metric([status], count)
    yield jobs


class RequestObserver:
    """ASGI middleware: request id, HTTP and per-adapter metrics, one log line per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        info = RequestInfo(sent if _REQUEST_ID.fullmatch(sent) else secrets.token_hex(8))
        token = _current.set(info)
        status, started, begun = 500, time.perf_counter(), False

        async def send_with_id(message):
            nonlocal status, begun
            if message["type"] == "http.response.start":
                status, begun = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", info.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # a bug: the client gets a short 500 with the id, the log gets the story
            log.exception("%s %s %s failed", info.request_id, scope["method"], scope["path"])
            if begun:  # nothing more can be said on a response that has begun
                raise
            await _internal_error(scope, info.request_id, send_with_id)
        finally:
            _current.reset(token)
            self._observe(scope, info, status, time.perf_counter() - started)

    def _observe(self, scope, info: RequestInfo, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = route.path if route is not None else "unmatched"  # templates, never raw paths: bounded labels
        runtime = getattr(scope["app"].state, "runtime", None)
        if runtime is not None:
            metrics = runtime.metrics
            metrics.http_requests.labels(scope["method"], path, str(status)).inc()
            metrics.http_duration.labels(scope["method"], path).observe(seconds)
            if info.adapter_id is not None or path in ("/generate", "/v1/completions", "/v1/chat/completions"):
                adapter = metrics.adapter_label(info.adapter_id)
                metrics.adapter_requests.labels(adapter, str(status)).inc()
                metrics.adapter_duration.labels(adapter).observe(seconds)
        fields = {"request_id": info.request_id, "method": scope["method"], "path": scope["path"], "route": path,
                  "status": status, "duration_ms": round(seconds * 1000, 1), "adapter_id": info.adapter_id}
        log.info("%s %s %s %d %.1f ms%s", info.request_id, scope["method"], scope["path"], status, seconds * 1000,
                 f" adapter={info.adapter_id}" if info.adapter_id else "", extra={"request": fields})


async def _internal_error(scope, request_id: str, send) -> None:
    """A 500 in the route's own error shape: OpenAI's under /v1, FastAPI's `detail` elsewhere."""
    message = f"internal server error (request id {request_id})"
    if scope["path"].startswith("/v1/"):
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    else:
        body = {"detail": message}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (a request line's fields inline)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry |= getattr(record, "request", {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str) -> None:
    """The process's log lines: plain text, or JSON (`LOG_FORMAT=json`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
