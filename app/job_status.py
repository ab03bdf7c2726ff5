"""A training job's status: the values its database column and the API's JSON carry.

Its own module, beside nothing else, so that the ORM models, the API schemas and the job
registry (app.jobs) name the same statuses without importing each other. A job is `queued`,
then `running` (claimed by a run), then one of the terminal statuses, which it never leaves;
a running job may also go back to `queued` (its run released it, or its worker was lost), or
stop as `paused` when asked to, until it is resumed (queued again) or cancelled."""

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"  # stopped at a step boundary with its state saved; `resume` queues it again
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
