"""All settings, from environment variables (or a `.env` file), in one place."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.webhook_urls import webhook_settings_problem


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Where the API listens. With no API keys configured it serves openly only on a loopback address.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Signs admin session cookies; default: a random key kept in the database, shared by every node.
    secret_key: str | None = None
    # Admin logins: after this many failures from one client address within the window, that
    # address gets 429 (with Retry-After) until the oldest failure leaves the window.
    login_max_failures: int = Field(10, ge=1)
    login_failure_window_s: float = Field(300.0, gt=0)
    # ...and from one direct peer, whatever addresses it forwards for (a proxy, or a client that
    # makes up X-Forwarded-For): a ceiling for everyone behind it.
    login_max_failures_per_peer: int = Field(50, ge=1)
    # Proxies whose X-Forwarded-For/-Proto are believed (comma-separated addresses, or "*").
    forwarded_allow_ips: str = "127.0.0.1,::1"

    # This node's own folder: the default SQLite registry, the embedded broker. No other node reads it.
    data_dir: Path = Path("data")
    database_url: str | None = None  # default: sqlite:///{data_dir}/softserve.db
    redis_url: str | None = None
    # Where adapter weights and uploaded datasets live, shared by every node (app.storage): in the
    # database, or in a folder every node mounts (STORAGE_DIR, default DATA_DIR).
    storage: Literal["database", "directory"] = "database"
    storage_dir: Path | None = None

    # Base model: a local Hugging Face folder, or unset for the bundled Gemma 3 270M.
    base_model: Path | None = None
    model_cache_dir: Path = Path.home() / ".cache" / "softserve" / "models"
    quantization: Literal["int8", "nf4", "bf16", "fp32"] = "int8"
    device: str | None = None  # default: cuda when available, else cpu
    # The dtype of everything not int8 (app.engine.dtypes): auto is float32 on the CPU; on CUDA
    # bfloat16 where the device has it, else float16 where a probe shows the model fits, else float32.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: the CPU's own int8 fast path on the CPU, bitsandbytes on CUDA. bitsandbytes: its own
    # int8 forward everywhere, so a CPU node runs exactly what a GPU node runs (for tests).
    int8_kernels: Literal["auto", "bitsandbytes"] = "auto"
    # LLM.int8 outlier decomposition picks outlier columns across the whole batch, so a row's
    # output would depend on its neighbours. 0.0 keeps every row batch-invariant (docs/engine.md,
    # property 6).
    llm_int8_threshold: float = 0.0
    # On CPUs where it is faster (AVX-512 VNNI), int8 weights are also kept packed for oneDNN, with
    # one product for projections that share an input: a second copy of the int8 weights, bought
    # for faster decode steps; on AVX2-only CPUs, their values packed as float16 for fbgemm instead
    # of its int8 layout (figures: bench/README.md).
    int8_packed_weights: bool = True

    # Serving limits. Rows join and leave the running batch at every engine step.
    max_batch_size: int = Field(32, ge=1, le=256)  # rows in the running batch
    max_step_tokens: int = Field(512, ge=16, le=16_384)  # tokens per forward pass: bounds one step's time
    # The most one layer's attention gathers and scores at once; more rows attend in slices.
    attention_memory_mb: int = Field(256, ge=1)
    # KV cache, preallocated: positions of every running row's soft prompt, prompt and output.
    # Requests wait while it is full. Unset: sized by the memory plan (app.engine.memory_plan) from
    # what the device has: GPU_MEMORY_UTILIZATION of a GPU, CPU_MEMORY_UTILIZATION of the free RAM.
    kv_cache_tokens: int | None = Field(None, ge=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_memory_utilization: float = Field(0.05, gt=0, le=1)
    # Positions of it kept for adapter prefixes (soft prompt + shared prompt start); 0 turns it off.
    prefix_cache_tokens: int = Field(4_096, ge=0)
    max_queue_size: int = Field(256, ge=1)
    # Worst-case KV positions (soft prompt + prompt + max new tokens) the waiting requests may
    # need in all: bounds the work one call can enqueue, whatever its number of prompts.
    max_queued_tokens: int = Field(65_536, ge=64)
    engine_threads: int | None = Field(None, ge=1, le=1024)  # cores the engine computes on; default all
    request_timeout_s: float = Field(300.0, gt=0)
    adapter_cache_size: int = Field(64, ge=1)
    max_new_tokens_limit: int = Field(512, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)

    # Adapter upload limits.
    max_adapter_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_virtual_tokens: int = Field(512, ge=1)

    # Training jobs.
    max_dataset_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    max_train_examples: int = Field(200_000, ge=1)
    dataset_parse_budget_s: float = Field(60.0, gt=0)  # reading one upload stops after this long
    heartbeat_interval_s: float = Field(2.0, gt=0)
    job_stale_after_s: float = Field(60.0, gt=0)  # no heartbeat for this long: worker presumed lost
    job_max_attempts: int = Field(2, ge=1)  # a lost job is retried once, then failed
    # A queued job whose message was sent this long ago and that no worker has claimed gets its
    # message sent again (the broker may have lost it); only one delivery can claim a job.
    job_resend_after_s: float = Field(1800.0, gt=0)
    job_time_limit_s: int = Field(6 * 3600, ge=60)
    # Training shares the node's model with serving: the longest it may hold the model while a
    # request waits (one stretch between its pause points; micro-batches shrink to fit).
    train_step_budget_s: float = Field(0.25, gt=0)

    # Webhooks (app.webhooks): job events (succeeded, failed, cancelled, paused), signed in the
    # Standard Webhooks form. WEBHOOK_URL is the operator's own and is called wherever it points; a
    # job's own `metadata.webhook_url` only for a host on WEBHOOK_ALLOWED_HOSTS (names or addresses,
    # comma-separated; "*": any host whose addresses are all public). A listed host is trusted as
    # it is; under "*", a private, loopback or link-local address is refused.
    webhook_url: str | None = Field(None, max_length=2000)
    # "whsec_<base64>" (or the bare base64) of at least 24 random bytes; needed for any webhook.
    webhook_secret: str | None = None
    webhook_allowed_hosts: str = ""
    webhook_max_attempts: int = Field(10, ge=1, le=100)  # then the delivery is given up
    webhook_backoff_base_s: float = Field(10.0, gt=0)  # retries after base, 2 x base, 4 x base ... (at most 1 h)
    webhook_timeout_s: float = Field(10.0, gt=0, le=300)  # one attempt: connect, send and answer

    # Operations: "json" makes every log line a JSON object (requests with id, route, status, timings).
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'softserve.db'}"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir
        if self.job_stale_after_s <= 2 * self.heartbeat_interval_s:
            raise ValueError("JOB_STALE_AFTER_S must be more than twice HEARTBEAT_INTERVAL_S")
        if (problem := webhook_settings_problem(self.webhook_url, self.webhook_secret, self.webhook_allowed_hosts)):
            raise ValueError(problem)
        return self

    @property
    def broker_url(self) -> str:
        """Redis when configured; otherwise kombu's SQLAlchemy transport on a SQLite file, a real
        broker that needs no server."""
        return self.redis_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
