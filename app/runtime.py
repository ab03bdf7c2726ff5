"""The composition root: what one node holds (settings, the resident model, the registry's
sessions, storage, the adapter cache and its resolver, the engine that owns the model, job
upkeep), wired together by Runtime.build, once per process, in `running`, which also runs the
job reaper's loop and the webhook deliveries'. The services themselves live in their own modules;
this one only connects them."""

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

from app import jobs, webhooks
from app.adapter_resolver import AdapterResolver
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.engine.adapter_cache import AdapterCache
from app.engine.core import EngineCore
from app.engine.engine import Engine
from app.engine.kv_cache import BLOCK_SIZE
from app.engine.loader import BaseModel, keep_freed_memory, load_base_model
from app.engine.memory_plan import MemorySettings, plan_memory
from app.engine.threads import in_own_thread
from app.job_queue import TRAIN_TASK, make_celery, make_data_dir
from app.job_upkeep import JobUpkeep
from app.observability import Metrics, runtime_families
from app.storage import Storage, make_storage
from app.storage_move import unmoved_folders
from app.webhook_delivery import deliver_forever

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    base: BaseModel
    sessions: sessionmaker[Session]
    storage: Storage
    adapter_cache: AdapterCache
    adapter_resolver: AdapterResolver
    engine: Engine
    metrics: Metrics
    celery: Celery | None = field(default=None)
    job_upkeep: JobUpkeep = field(init=False)  # made from the others: it sends through enqueue_training

    @classmethod
    def build(cls, settings: Settings, base: BaseModel, sessions: sessionmaker[Session], serves: bool = True,
              trains: bool = True) -> "Runtime":
        """`serves`: the node answers requests (else its engine keeps no serving KV pool);
        `trains`: it runs training jobs (on a GPU the memory plan keeps room for them)."""
        make_data_dir(settings)  # before the broker's first use: the embedded one is a file there
        storage = make_storage(settings, sessions)
        adapter_cache = AdapterCache(settings.adapter_cache_size, base.device, base.embed_dtype)
        runtime = cls(
            celery=make_celery(settings),
            metrics=Metrics(),
            settings=settings,
            base=base,
            sessions=sessions,
            storage=storage,
            adapter_cache=adapter_cache,
            adapter_resolver=AdapterResolver(base, sessions, storage, adapter_cache),
            engine=Engine(
                partial(planned_core, base, settings, serves, trains),
                max_queue_size=settings.max_queue_size,
                max_queued_tokens=settings.max_queued_tokens,
                threads=settings.engine_threads,
                train_step_budget_s=settings.train_step_budget_s,
                serves=serves,
            ),
        )
        runtime.metrics.watch(runtime._figures)
        return runtime

    def __post_init__(self) -> None:
        self.job_upkeep = JobUpkeep(
            self.sessions, self.storage, send=self.enqueue_training,
            stale_after=timedelta(seconds=self.settings.job_stale_after_s),
            resend_after=timedelta(seconds=self.settings.job_resend_after_s),
            max_attempts=self.settings.job_max_attempts,
        )

    def _figures(self):
        """What /metrics reads at scrape time: the engine, the adapter cache and lookups, the registry's jobs."""
        with self.sessions() as session:
            job_counts = jobs.count_by_status(session)
        return runtime_families(self.engine.stats(), self.adapter_cache.stats() | self.adapter_resolver.stats(), job_counts)

    def enqueue_training(self, job_id: str) -> None:
        """Send the job's message to the broker, then record that it was sent."""
        self.celery.send_task(TRAIN_TASK, args=[job_id])
        with self.sessions() as session:
            jobs.mark_sent(session, job_id)

    async def reap_forever(self) -> None:
        """The job reaper: a pass of job upkeep every quarter of the stale timeout."""
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
            await self.job_upkeep.run_pass()

    def forget_adapter(self, adapter_id: str) -> None:
        """After a delete: drop its weights and its cached prefixes."""
        self.adapter_resolver.forget(adapter_id)
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
    if serves and base.device.type == "cpu":  # a decode step's logits at the batch limit, reused from the heap step after step
        keep_freed_memory(base.logits_bytes(settings.max_batch_size))
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
    runtime = Runtime.build(settings, model, make_session_factory(db_engine, webhooks.session_info(settings)),
                            serves, trains)
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
    hooks = (asyncio.create_task(deliver_forever(runtime.sessions, settings), name="webhook-deliveries")
             if settings.webhook_secret else None)
    try:
        yield runtime
    finally:
        reaper.cancel()
        if hooks is not None:
            hooks.cancel()
        await runtime.engine.stop()
        db_engine.dispose()


@asynccontextmanager
async def serving(runtime: Runtime, services: Sequence[NodeService]) -> AsyncIterator[None]:
    """Run `services` beside the runtime's engine; stop them (in reverse order) before it stops."""
    async with AsyncExitStack() as stack:
        for service in services:
            await stack.enter_async_context(service(runtime))
        yield
