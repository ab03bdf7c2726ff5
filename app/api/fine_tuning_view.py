"""How training jobs and their events read through OpenAI's fine-tuning API: the
`fine_tuning.job` and `fine_tuning.job.event` objects, made from the registry's TrainJob and
JobEvent rows. Any job reads this way, however it was made; its /train-jobs view rides along as
the `softserve` extension. A service module, so that every router showing OpenAI's jobs uses it."""

from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from app.api.job_view import job_out
from app.job_status import JobStatus
from app.model_names import fine_tuned_model
from app.models import JobCheckpoint, JobEvent, TrainJob
from app.schemas import TrainJobOut
from app.train_config import DEFAULT_LEARNING_RATES
from app.webhook_delivery import origin
from app.webhooks import METADATA_URL_KEY

EVENT_PREFIX = "ftevent-"

# OpenAI's statuses. softserve validates files on upload, so a job is never `validating_files`:
# it is queued at once. Every JobStatus has OpenAI's name for it.
Status = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
Auto = Literal["auto"]
Level = Literal["info", "warn", "error"]
LEVELS = get_args(Level)

JOB_EXAMPLE = {
    "id": "a41c9e2f0b7d", "object": "fine_tuning.job", "created_at": 1796014800, "finished_at": 1796015100,
    "model": "gemma-3-270m", "fine_tuned_model": "ft:gemma-3-270m:sst2:3f9a1c2b7d4e", "organization_id": "softserve",
    "status": "succeeded", "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0},
    "training_file": "file-3f9a1c2b7d4e5a6b7c8d9e0f", "validation_file": None, "result_files": [],
    "trained_tokens": None, "error": None, "seed": 0, "suffix": "sst2", "metadata": {"team": "reviews"},
    "method": {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0}}},
    "estimated_finish": None, "integrations": [],
}


class JobHyperparameters(BaseModel):
    n_epochs: float | Auto = Field(description="auto: the job runs max_steps (softserve) steps instead")
    batch_size: int
    learning_rate_multiplier: float = Field(description="Of the method's default learning rate")


class SupervisedOut(BaseModel):
    hyperparameters: JobHyperparameters


class MethodOut(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedOut


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int = Field(description="Unix time")
    finished_at: int | None
    model: str = Field(description="The base model's name, or the id of the adapter the job continues from")
    fine_tuned_model: str | None = Field(description="The adapter it made, by its OpenAI name (a valid `model`)")
    organization_id: str = "softserve"
    status: Status
    hyperparameters: JobHyperparameters
    training_file: str | None = Field(description="null for a job made through POST /train-jobs")
    validation_file: str | None
    result_files: list[str] = []
    trained_tokens: int | None = None
    error: FineTuningError | None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    method: MethodOut
    estimated_finish: int | None
    integrations: list = []
    softserve: TrainJobOut = Field(description="The job as /train-jobs shows it: progress, losses, the adapter id")


class FineTuningJobList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [JOB_EXAMPLE], "has_more": False}]})

    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Level
    message: str
    type: Literal["message", "metrics"]
    data: dict | None = None


class FineTuningJobEventList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "has_more": False, "data": [
        {"id": "ftevent-42", "object": "fine_tuning.job.event", "created_at": 1796015000, "level": "info",
         "message": "Step 50/100: validation loss=0.4120, accuracy=0.810", "type": "metrics",
         "data": {"step": 50, "valid_loss": 0.412, "valid_mean_token_accuracy": 0.81}},
    ]}]})

    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int
    train_loss: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="The checkpoint's adapter by its OpenAI name: a valid `model`")
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "has_more": False, "data": [
        {"id": "ftckpt-7c1e04a9b2d3", "object": "fine_tuning.job.checkpoint", "created_at": 1796015000,
         "fine_tuned_model_checkpoint": "ft:gemma-3-270m:sst2:7c1e04a9b2d3:ckpt-step-100",
         "fine_tuning_job_id": "a41c9e2f0b7d", "step_number": 100,
         "metrics": {"step": 100, "train_loss": 0.41, "valid_loss": 0.37, "valid_mean_token_accuracy": 0.85}},
    ]}]})

    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def _unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def shown_metadata(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """The job's metadata as anyone who may read the job sees it: its webhook URL cut to its origin,
    since the path and query may carry a token (an inference key reads jobs; the admin sees the
    origin too, as on the job's webhook deliveries)."""
    if not metadata or METADATA_URL_KEY not in metadata:
        return metadata
    shown = dict(metadata)
    try:
        shown[METADATA_URL_KEY] = origin(metadata[METADATA_URL_KEY])
    except ValueError:  # not a URL at all: nothing of it is shown
        del shown[METADATA_URL_KEY]
    return shown


def job_hyperparameters(params: dict) -> JobHyperparameters:
    """OpenAI's three, from the job's stored configuration (app.train_config)."""
    # Jobs stored before prefix tuning existed name no method: they are prompt tuning.
    multiplier = params["learning_rate"] / DEFAULT_LEARNING_RATES[params.get("method", "prompt_tuning")]
    return JobHyperparameters(n_epochs=params["epochs"] if params.get("epochs") is not None else "auto",
                              batch_size=params["batch_size"], learning_rate_multiplier=round(multiplier, 12))


def fine_tuning_job(job: TrainJob, base_name: str) -> FineTuningJob:
    hyperparameters = job_hyperparameters(job.params)
    view = job_out(job)
    return FineTuningJob(
        id=job.id, created_at=int(job.created_at.timestamp()), finished_at=_unix(job.finished_at),
        model=job.base_adapter_id or base_name,
        fine_tuned_model=fine_tuned_model(base_name, job.suffix, job.adapter_id) if job.adapter_id else None,
        status=job.status, hyperparameters=hyperparameters, training_file=job.training_file,
        validation_file=job.validation_file,
        error=FineTuningError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        seed=job.params["seed"], suffix=job.suffix, metadata=shown_metadata(job.job_metadata),
        method=MethodOut(supervised=SupervisedOut(hyperparameters=hyperparameters)),
        estimated_finish=_unix(view.estimated_finish), softserve=view,
    )


def event_id(event: JobEvent) -> str:
    return f"{EVENT_PREFIX}{event.id}"


def fine_tuning_event(event: JobEvent, job: TrainJob) -> FineTuningJobEvent:
    """A loss point or an evaluation is a `metrics` event, with OpenAI's names for its figures;
    anything else a `message`, at level error when it is the message the job failed with."""
    data, head = event.data, dict(id=event_id(event), created_at=int(event.created_at.timestamp()))
    if event.kind == "train":
        return FineTuningJobEvent(**head, level="info", type="metrics",
                                  message=f"Step {event.step}/{job.total_steps}: training loss={data['loss']:.4f}",
                                  data={"step": event.step, "train_loss": data["loss"], "total_steps": job.total_steps})
    if event.kind == "eval":
        # softserve's accuracy is exact match of whole outputs; it goes in the field OpenAI's
        # tools read for validation accuracy.
        return FineTuningJobEvent(
            **head, level="info", type="metrics",
            message=f"Step {event.step}: validation loss={data['loss']:.4f}, accuracy={data['accuracy']:.3f}",
            data={"step": event.step, "valid_loss": data["loss"], "valid_mean_token_accuracy": data["accuracy"]})
    message = str(data.get("message", data))
    failed = job.status == JobStatus.FAILED and message == job.error_message
    level = data["level"] if data.get("level") in LEVELS else "error" if failed else "info"
    return FineTuningJobEvent(**head, level=level, type="message", message=message)


def fine_tuning_checkpoint(checkpoint: JobCheckpoint, job: TrainJob, base_name: str) -> FineTuningJobCheckpoint:
    """A checkpoint, named as its job's fine-tuned model is with ":ckpt-step-<n>" after it (the
    name's fourth field is the checkpoint's own adapter: app.model_names)."""
    metrics = checkpoint.metrics
    name = f"{fine_tuned_model(base_name, job.suffix, checkpoint.adapter_id)}:ckpt-step-{checkpoint.step}"
    return FineTuningJobCheckpoint(
        id=checkpoint.id, created_at=int(checkpoint.created_at.timestamp()), fine_tuned_model_checkpoint=name,
        fine_tuning_job_id=job.id, step_number=checkpoint.step,
        metrics=CheckpointMetrics(step=checkpoint.step, train_loss=metrics.get("train_loss"),
                                  valid_loss=metrics.get("eval_loss"),
                                  valid_mean_token_accuracy=metrics.get("eval_accuracy")))
