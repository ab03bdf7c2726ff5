"""The node's training consumer: a Celery worker inside the node's own process, on one thread with
the solo pool (the way Celery's own test harness embeds workers). It takes one job at a time,
with late acks, and runs it on the node's resident model, handing every computation to the
node's engine: the model is loaded once per node, whether the node also serves or only trains.
"""

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from celery.worker import state as worker_state

from app.job_queue import TRAIN_TASK
from app.runtime import Runtime
from worker.job_runner import RunOutcome, run_job

log = logging.getLogger(__name__)


class TrainingConsumer:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.stopping = threading.Event()  # the running job gives itself back at its next micro-step
        # Not shared (a shared task joins every Celery app of the process, the first callable
        # winning), and the worker thread's current app is the node's: with several nodes in one
        # process (tests), each consumer runs its own node's jobs.
        runtime.celery.task(name=TRAIN_TASK, shared=False)(self.train)
        self._worker = runtime.celery.WorkController(
            pool="solo", concurrency=1, hostname=f"softserve-{os.getpid()}@{socket.gethostname()}",
            without_heartbeat=True, without_mingle=True, without_gossip=True,  # one consumer, no peers to talk to
        )
        self._thread = threading.Thread(target=self._consume, name="training-consumer", daemon=True)

    def train(self, job_id: str) -> RunOutcome:
        runtime, started = self.runtime, time.perf_counter()
        outcome = run_job(job_id, settings=runtime.settings, sessions=runtime.sessions, base=runtime.base,
                          device=runtime.engine, node_stopping=self.stopping)
        if outcome.ended_job:
            runtime.metrics.job_duration.labels(outcome).observe(time.perf_counter() - started)
        if outcome == RunOutcome.RELEASED:
            try:  # so that another node takes it now, not at the next reaper pass
                runtime.enqueue_training(job_id)
            except Exception:
                log.exception("job %s: could not send it again; the reaper will", job_id)
        return outcome

    def _consume(self) -> None:
        self.runtime.celery.set_current()
        self._worker.start()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop consuming; a running job stops at its next micro-step and is queued again."""
        self.stopping.set()
        worker_state.should_stop = 0  # Celery's warm shutdown: the consumer loop ends after the running task
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the training consumer did not stop within %s s", timeout)
        worker_state.should_stop = None  # Celery's flag is process-wide: a later consumer must start clean


@asynccontextmanager
async def training_consumer(runtime: Runtime) -> AsyncIterator[TrainingConsumer]:
    """A NodeService: the consumer runs for as long as the node does."""
    consumer = TrainingConsumer(runtime)
    consumer.start()
    try:
        yield consumer
    finally:
        await asyncio.to_thread(consumer.stop)
