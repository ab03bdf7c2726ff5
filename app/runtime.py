"""What one node holds: settings, the resident model, the registry's sessions, the adapter cache
and the engine that owns the model. Built once per process, by `running`."""

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app import adapter_files, jobs, registry
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.engine import prefix_kv
from app.engine.adapter_cache import AdapterCache
from app.engine.core import EngineCore
from app.engine.engine import Engine
from app.engine.kv_cache import BLOCK_SIZE
from app.engine.memory_plan import MemorySettings, plan_memory
from app.engine.loader import BaseModel, load_base_model
from app.engine.requests import SoftPrompt
from app.engine.threads import in_own_thread
from app.job_queue import TRAIN_TASK, make_celery, make_data_dir
from app.observability import Metrics, runtime_families
from app.storage import DATASETS, TRAIN_STATES, NotStored, Storage, adapter_key, make_storage, train_state_job
from app.storage_move import unmoved_folders

log = logging.getLogger(__name__)


class AdapterNotFound(LookupError):
    pass


class AdapterBaseMismatch(ValueError):
    pass


@dataclass
class Runtime:
    settings: Settings
    base: BaseModel
    sessions: sessionmaker[Session]
    storage: Storage
    cache: AdapterCache
    engine: Engine
    metrics: Metrics
    celery: Celery | None = field(default=None)

    @classmethod
    def build(cls, settings: Settings, base: BaseModel, sessions: sessionmaker[Session], serves: bool = True,
              trains: bool = True) -> "Runtime":
        """`serves`: the node answers requests (else its engine keeps no serving KV pool);
        `trains`: it runs training jobs (on a GPU the memory plan keeps room for them)."""
        make_data_dir(settings)  # before the broker's first use: the embedded one is a file there
        runtime = cls(
            celery=make_celery(settings),
            metrics=Metrics(),
            settings=settings,
            base=base,
            sessions=sessions,
            storage=make_storage(settings, sessions),
            cache=AdapterCache(settings.adapter_cache_size, base.device, base.embed_dtype),
            engine=Engine(
                partial(planned_core, base, settings, serves, trains),
                max_queue_size=settings.max_queue_size,
                max_queued_tokens=settings.max_queued_tokens,
                threads=settings.engine_threads,
                train_step_budget_s=settings.train_step_budget_ms / 1000,
                serves=serves,
            ),
        )
        runtime.metrics.watch(runtime._figures)
        return runtime

    def _figures(self):
        """What /metrics reads at scrape time: the engine, the adapter cache, the registry's jobs."""
        with self.sessions() as session:
            job_counts = jobs.count_by_status(session)
        return runtime_families(self.engine.stats(), self.cache.stats(), job_counts)

    def enqueue_training(self, job_id: str) -> None:
        """Send the job's message to the broker, then record that it was sent."""
        self.celery.send_task(TRAIN_TASK, args=[job_id])
        with self.sessions() as session:
            jobs.mark_sent(session, job_id)

    def reap_stale_jobs(self) -> list[str]:
        """Requeue or fail jobs whose worker stopped heartbeating; send_unsent_jobs sends the requeued."""
        settings = self.settings
        with self.sessions() as session:
            requeued = jobs.reap_stale(session, stale_after=timedelta(seconds=settings.job_stale_after_s),
                                       max_attempts=settings.job_max_attempts, alive=jobs.live_runs.snapshot())
        for job_id in requeued:
            log.warning("job %s lost its worker; queued again", job_id)
        return requeued

    def send_unsent_jobs(self) -> list[str]:
        """Send a message for each queued job that has none in the broker (see jobs.unsent)."""
        settings = self.settings
        with self.sessions() as session:
            due = jobs.unsent(session, unsent_after=timedelta(seconds=settings.job_stale_after_s),
                              resend_after=timedelta(seconds=settings.job_resend_after_s))
        for job_id in due:  # a broker still down raises here; the next pass tries again
            self.enqueue_training(job_id)
            log.warning("job %s was queued with no message in the broker; sent", job_id)
        return due

    def delete_ended_datasets(self) -> list[str]:
        """Delete the uploaded datasets and saved run states of jobs that have ended: only a run
        reads them."""
        datasets, states = self.storage.keys(DATASETS), self.storage.keys(TRAIN_STATES)
        if not datasets and not states:
            return []
        with self.sessions() as session:
            ended = jobs.ended_datasets(session, datasets) if datasets else []
            ended_jobs = jobs.ended_jobs(session, {train_state_job(key)[0] for key in states})
        ended += [key for key in states if train_state_job(key)[0] in ended_jobs]
        for key in ended:
            self.storage.delete(key)
        return ended

    async def reap_forever(self) -> None:
        chores = (self.reap_stale_jobs, self.send_unsent_jobs, self.delete_ended_datasets)
        interval = self.settings.job_stale_after_s / 4
        while True:
            slept_from = time.monotonic()
            await asyncio.sleep(interval)
            overslept = time.monotonic() - slept_from - interval
            if overslept > interval:
                # This process was paused or starved, and so, maybe, were the runs it would judge
                # (nodes on one frozen host): let their heartbeats catch up first.
                log.warning("the job reaper woke %.0f s late; judging heartbeats at its next pass", overslept)
                continue
            for chore in chores:  # each on its own: a broker outage must not stop the others
                try:
                    await asyncio.to_thread(chore)
                except Exception:
                    log.exception("job reaper: %s failed", chore.__name__)

    def _lookup(self, adapter_id: str) -> tuple[str, str, str | None] | None:
        with self.sessions() as session:
            adapter = registry.get_adapter(session, adapter_id)
            return (adapter.base_fingerprint, adapter.sha256, adapter.template) if adapter else None

    async def soft_prompt(self, adapter_id: str) -> tuple[SoftPrompt, str | None]:
        """The adapter's prompt embeddings on the model's device, and its template. The registry
        is checked on every request, so a deleted adapter stops being served at once, and the
        cache is keyed by id and content hash, so a replaced one is never served stale."""
        found = await asyncio.to_thread(self._lookup, adapter_id)
        if found is None:
            raise AdapterNotFound(adapter_id)
        fingerprint, sha256, template = found
        if fingerprint != self.base.fingerprint:
            raise AdapterBaseMismatch(
                f"adapter {adapter_id} was made for base model {fingerprint}, this server runs {self.base.fingerprint}"
            )
        try:
            soft_prompt = await self.cache.get((adapter_id, sha256), partial(self._read_prompt, adapter_id))
        except NotStored:  # deleted between the lookup and the load
            raise AdapterNotFound(adapter_id) from None
        return soft_prompt, template

    def _read_prompt(self, adapter_id: str) -> SoftPrompt:
        served, is_prefix = adapter_files.read_served(self.storage.read_all(adapter_key(adapter_id)))
        if is_prefix:
            return SoftPrompt.prefix(prefix_kv.from_flat(served, self.base.kv_shape), adapter_id)
        return SoftPrompt(served, adapter_id)

    def forget_adapter(self, adapter_id: str) -> None:
        """After a delete: drop its weights and its cached prefixes."""
        self.cache.evict(adapter_id)
        self.engine.drop_adapter(adapter_id)


def planned_core(base: BaseModel, settings: Settings, serves: bool, trains: bool) -> EngineCore:
    """The engine core, its KV pool sized by the memory plan (on the engine's thread, where the
    pool is allocated: profiling there leaves the thread's state as serving will find it)."""
    # the largest request the API admits: soft prompt, prompt and new tokens at their limits
    max_row_positions = settings.max_virtual_tokens + settings.max_prompt_tokens + settings.max_new_tokens_limit
    plan = plan_memory(base, MemorySettings(
        kv_cache_tokens=settings.kv_cache_tokens, gpu_memory_utilization=settings.gpu_memory_utilization,
        cpu_memory_utilization=settings.cpu_memory_utilization, max_step_tokens=settings.max_step_tokens,
        max_rows=settings.max_batch_size, max_row_positions=max_row_positions, serves=serves, trains=trains))
    log.info("memory plan (%s): weights %.0f MiB, activations %.0f MiB, KV cache %d positions (%.0f MiB), %.0f MiB free",
             plan.basis, plan.weights_bytes / 2**20, plan.activation_reserve_bytes / 2**20, plan.kv_cache_tokens,
             plan.kv_cache_bytes / 2**20, plan.free_bytes / 2**20)
    return EngineCore(base, kv_tokens=max(plan.kv_cache_tokens, BLOCK_SIZE), max_rows=settings.max_batch_size,
                      max_step_tokens=settings.max_step_tokens, prefix_cache_tokens=settings.prefix_cache_tokens,
                      max_row_positions=max_row_positions, memory_plan=plan,
                      attention_temporary_bytes=settings.attention_memory_mb << 20)


# What a node runs beside its engine (the training consumer): started once the engine runs,
# stopped before it stops.
NodeService = Callable[[Runtime], AbstractAsyncContextManager]


@asynccontextmanager
async def running(settings: Settings, base: BaseModel | None = None, serves: bool = True,
                  trains: bool = True) -> AsyncIterator[Runtime]:
    """A node's lifetime: load the model once (unless given), start its engine and the job
    reaper; stop them in reverse order. `serves` and `trains`: see Runtime.build."""
    model = base or in_own_thread(
        load_base_model, settings.base_model, settings.model_cache_dir, settings.quantization, settings.device,
        settings.llm_int8_threshold, settings.int8_packed_weights, settings.compute_dtype, settings.int8_kernels,
    )
    log.info("model %s (%s, computing in %s, int8 kernels: %s) on %s", model.fingerprint, model.quantization,
             model.embed_dtype, model.int8_kernels, model.device)
    db_engine = make_engine(settings.database_url)
    runtime = Runtime.build(settings, model, make_session_factory(db_engine), serves, trains)
    if settings.storage == "database" and (unmoved := unmoved_folders(settings.data_dir)):
        log.warning("%d adapter or dataset folders under %s are not in the database: run `python -m app.cli "
                    "move-files-to-database` once (or set STORAGE=directory to read them there); it lists those it "
                    "leaves, which no adapter or job names", unmoved, settings.data_dir)
    runtime.engine.start()
    # What start-up made (the model, torch's and transformers' modules: millions of objects) stays:
    # keep it out of the collector's full passes, each of which would pause every thread to walk it.
    gc.collect()
    gc.freeze()
    reaper = asyncio.create_task(runtime.reap_forever(), name="job-reaper")
    try:
        yield runtime
    finally:
        reaper.cancel()
        await runtime.engine.stop()
        db_engine.dispose()


@asynccontextmanager
async def serving(runtime: Runtime, services: Sequence[NodeService]) -> AsyncIterator[None]:
    """Run `services` beside the runtime's engine; stop them (in reverse order) before it stops."""
    async with AsyncExitStack() as stack:
        for service in services:
            await stack.enter_async_context(service(runtime))
        yield
