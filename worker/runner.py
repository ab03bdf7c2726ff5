"""Run one training job end to end: claim it, train with progress, heartbeat and cancel,
write and register the adapter, finish the job. No Celery here: tasks.py only calls run_job."""

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app import jobs, registry
from app.config import Settings
from app.datasets import read_jsonl
from app.engine.loader import BaseModel
from worker.training import Hooks, TrainConfig, TrainResult, train_prompt

log = logging.getLogger(__name__)


class _Heartbeat:
    """Background thread: refreshes the job's heartbeat and notices cancel requests."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, interval: float):
        self.cancel_requested = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sessions, job_id, interval), daemon=True)

    def _run(self, sessions, job_id, interval):
        while not self._stop.wait(interval):
            try:
                with sessions() as session:
                    if jobs.heartbeat(session, job_id):
                        self.cancel_requested.set()
            except Exception:  # a missed beat is not fatal; the next one may succeed
                log.exception("heartbeat for job %s failed", job_id)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _metrics(result: TrainResult) -> dict:
    return {
        "eval_loss": result.eval_loss,
        "eval_accuracy": result.eval_accuracy,
        "train_examples": result.train_examples,
        "eval_examples": result.eval_examples,
        "steps": result.steps,
        "best_step": result.best_step,
        "duration_s": round(result.seconds, 1),
        "stopped_early": result.stopped_early,
    }


def run_job(job_id: str, *, settings: Settings, sessions: sessionmaker[Session], get_base: Callable[[], BaseModel]) -> str:
    """Returns the job's final status, or "skipped" when this delivery did not win the claim."""
    with sessions() as session:
        if not jobs.claim(session, job_id, f"{socket.gethostname()}:{os.getpid()}"):
            log.info("job %s not claimable (duplicate delivery, cancelled or finished); skipping", job_id)
            return "skipped"
        job = jobs.get_job(session, job_id)
        name, params, dataset_dir = job.name, dict(job.params), settings.data_dir / job.dataset_path

    def on_step(step, total, epoch, loss):
        with sessions() as session:
            jobs.record_step(session, job_id, step, total, epoch, loss)

    def on_eval(step, loss, accuracy):
        with sessions() as session:
            jobs.record_eval(session, job_id, step, loss, accuracy)

    with _Heartbeat(sessions, job_id, settings.heartbeat_interval_s) as beat:
        try:
            base = get_base()
            validation_file = Path(dataset_dir) / "validation.jsonl"
            result = train_prompt(
                base, TrainConfig(**params), read_jsonl(Path(dataset_dir) / "train.jsonl"),
                read_jsonl(validation_file) if validation_file.exists() else None,
                Hooks(on_step=on_step, on_eval=on_eval, should_cancel=beat.cancel_requested.is_set),
            )
        except Exception as exc:
            log.exception("job %s failed", job_id)
            with sessions() as session:
                jobs.finish(session, job_id, "failed", message=f"training failed: {type(exc).__name__}: {exc}",
                            error_code="training_error")
            return "failed"

    with sessions() as session:
        if result.cancelled:
            jobs.finish(session, job_id, "cancelled", message=f"cancelled at step {result.steps}")
            return "cancelled"
        # The adapter's files are complete before its row exists, and the row before the job says succeeded.
        adapter = registry.register_adapter(
            session, adapters_dir=settings.adapters_dir, name=name, prompt_embeddings=result.prompt_embeddings,
            base_fingerprint=base.fingerprint, base_model_name=base.name, source="trained",
            metrics=_metrics(result), template=params.get("template"),
        )
        jobs.finish(session, job_id, "succeeded", adapter_id=adapter.id, eval_loss=result.eval_loss,
                    eval_accuracy=result.eval_accuracy,
                    message=f"adapter {adapter.id} registered (eval accuracy {result.eval_accuracy})")
    return "succeeded"
