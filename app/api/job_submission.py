"""Queueing a training job: its dataset and its row stored in one transaction, then its message
sent to the broker. The one way jobs are made, whichever face of the API asks (/train-jobs, or
OpenAI's /v1/fine_tuning/jobs): a service module, so neither router imports the other."""

from fastapi import HTTPException

from app import jobs
from app.models import TrainJob, new_id
from app.runtime import Runtime
from app.storage import dataset_key
from app.train_config import TrainConfig


def store_and_queue(runtime: Runtime, name: str | None, config: TrainConfig, train: bytes,
                    validation: bytes | None, **job_fields) -> TrainJob:
    """Store the dataset (normalised JSONL) and the job in one transaction, then send the job's
    message; if the broker is down, take both back (503), so nothing half-made remains.
    `job_fields`: more of the job's columns (the OpenAI API's suffix, files, metadata...)."""
    job_id = new_id()
    key = dataset_key(job_id)  # server-made; the client's filename is never a key
    files = {"train.jsonl": train} | ({"validation.jsonl": validation} if validation else {})
    storage = runtime.storage
    with runtime.sessions() as session:
        with storage.storing(session, key, files):
            job = jobs.create_job(session, job_id=job_id, name=name or f"adapter-{job_id}", params=config.to_dict(),
                                  dataset_path=key, train_examples=train.count(b"\n"),
                                  validation_examples=validation.count(b"\n") if validation else 0, **job_fields)
        try:
            runtime.enqueue_training(job_id)
        except Exception as exc:
            with storage.deleting(session, key):
                session.delete(job)
                session.commit()
            raise HTTPException(503, detail=f"job queue unavailable: {exc}", headers={"Retry-After": "5"}) from None
        return job
