"""OpenAI's fine-tuning jobs API: create, list, retrieve, cancel, pause, resume, events, checkpoints. One more face of the job
machinery behind /train-jobs (app.jobs, app.api.job_submission), not a second one: the same jobs
show through both, and a job made here is queued, run and cancelled as any other.

A job trains on files uploaded through /v1/files; its dataset is copied from the file into the
job's own storage as /train-jobs stores one, so the job never depends on the file again (a file
is still kept, by refusing its deletion, until every job naming it has ended). `model` is the
base model's name, or an adapter (by id or fine-tuned name) to continue training from. OpenAI's
hyperparameters map onto softserve's (n_epochs -> epochs, learning_rate_multiplier x the
method's default rate); softserve's own settings go in the `softserve` object.

Auth: creating, cancelling, pausing and resuming need an admin key; an inference key may read."""

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator
from sqlalchemy.orm import Session

from app import adapter_files, jobs, registry, uploaded_files
from app.api.deps import JobId, RuntimeDep, SessionDep
from app.api.fine_tuning_view import (
    EVENT_PREFIX,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
    fine_tuning_checkpoint,
    fine_tuning_event,
    fine_tuning_job,
)
from app.api.job_submission import store_and_queue
from app.api.openai_errors import OpenAIErrorRoute, openai_refusal
from app.auth import AdminAuth
from app.job_status import TERMINAL, JobStatus
from app.model_names import adapter_for_model
from app.models import Adapter, TrainJob, UploadedFile
from app.runtime import Runtime
from app.schemas import NoNul, valid_unicode
from app.storage import NotStored, adapter_key
from app.train_config import DEFAULT_LEARNING_RATES, TrainConfig, TrainConfigBase, broken_rule, eval_within_the_run
from app.webhook_urls import webhook_url_problem
from app.webhooks import METADATA_URL_KEY

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], route_class=OpenAIErrorRoute)

Auto = Literal["auto"]
# OpenAI's limits on metadata: 16 pairs, keys of up to 64 characters, values of up to 512.
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64), NoNul]
MetadataValue = Annotated[str, StringConstraints(max_length=512), NoNul]
FileRef = Annotated[str, StringConstraints(min_length=1, max_length=40), NoNul]
# Set from OpenAI's own fields, not from the softserve object.
OPENAI_SET = {"seed": "seed", "epochs": "n_epochs", "batch_size": "batch_size", "learning_rate": "learning_rate_multiplier"}


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    n_epochs: Auto | Annotated[int, Field(ge=1, le=1000)] = Field(
        "auto", description="Passes over the training data; auto: softserve.max_steps steps (default 300)")
    batch_size: Auto | Annotated[int, Field(ge=1, le=512)] = Field("auto", description="auto: 8")
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = Field(
        "auto", description=f"Times the method's default learning rate {DEFAULT_LEARNING_RATES}; auto: 1")


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["supervised"] = Field(description="Only supervised fine-tuning (dpo and reinforcement are not)")
    supervised: Supervised | None = None


# softserve's own settings of the job (app.train_config), defaulting as POST /train-jobs does:
# its method (prompt or prefix tuning), num_virtual_tokens, template, max_steps, eval_every...
# seed, epochs, batch_size and learning_rate come from OpenAI's fields instead.
class SoftserveOptions(TrainConfigBase):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"num_virtual_tokens": 20, "template": "Review: {input}\nSentiment:", "max_steps": 100, "eval_every": 50}]})

    _eval_within_the_run = field_validator("eval_every")(eval_within_the_run)

    @model_validator(mode="before")
    @classmethod
    def _openai_fields_elsewhere(cls, values: Any) -> Any:
        given = [field for field in OPENAI_SET if isinstance(values, dict) and field in values]
        if given:
            raise broken_rule(f"{', '.join(given)}: set by OpenAI's fields here (seed, and n_epochs, batch_size and "
                             "learning_rate_multiplier in method.supervised.hyperparameters)")
        return values


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, json_schema_extra={"examples": [{
        "model": "gemma-3-270m", "training_file": "file-3f9a1c2b7d4e5a6b7c8d9e0f", "suffix": "sst2",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        "softserve": {"num_virtual_tokens": 20, "template": "Review: {input}\nSentiment:"},
    }]})

    model: Annotated[str, StringConstraints(min_length=1, max_length=200), NoNul] = Field(description=(
        "The base model's name, or an adapter (its id or ft: name) to continue training from"))
    training_file: FileRef = Field(description="A file uploaded with purpose fine-tune")
    validation_file: FileRef | None = None
    # No colon: the fine-tuned model's name is colon-separated (app.model_names).
    suffix: Annotated[str | None, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] = Field(
        None, description="Up to 64 letters, digits, '.', '_' or '-': goes into fine_tuned_model and the adapter's name")
    seed: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None
    metadata: Annotated[dict[MetadataKey, MetadataValue] | None, Field(max_length=16)] = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI: use method")
    integrations: list | None = Field(None, description="Not supported: leave it out or empty")
    softserve: SoftserveOptions | None = None

    _valid_unicode = field_validator("model", "training_file", "validation_file", mode="before")(valid_unicode)

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list | None) -> list | None:
        if value:
            raise broken_rule("are not supported (such as wandb): leave them out, or send []")
        return value

    @model_validator(mode="after")
    def _hyperparameters_once(self):
        if self.hyperparameters is not None and self.method is not None and self.method.supervised is not None \
                and self.method.supervised.hyperparameters is not None:
            raise broken_rule("give hyperparameters in method.supervised.hyperparameters or at the top level, not both")
        return self

    def given_hyperparameters(self) -> tuple[Hyperparameters, tuple[str, ...]]:
        """The hyperparameters asked for, and where in the body they were."""
        if self.method is not None and self.method.supervised is not None and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters, ("method", "supervised", "hyperparameters")
        return self.hyperparameters or Hyperparameters(), ("hyperparameters",)


def _invalid(loc: tuple, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": "value_error"}])


def _uploaded(session: Session, file_id: str, field: str) -> UploadedFile:
    row = uploaded_files.get_file(session, file_id)
    if row is None:
        raise openai_refusal(404, f"{field}: no such file: {file_id!r}", param=field, code="file_not_found")
    return row


def _warm_start(runtime: Runtime, session: Session, model: str) -> tuple[Adapter | None, dict]:
    """The adapter `model` names to continue from (None: the base model), and the settings a job
    continuing from it defaults to: its method, size and template."""
    adapter_id = adapter_for_model(model, runtime.base.name)
    if adapter_id is None:
        return None, {}
    adapter = registry.get_adapter(session, adapter_id)
    if adapter is None:
        raise openai_refusal(404, f"model: no base model or adapter {model!r} (see GET /v1/models)", param="model",
                             code="model_not_found")
    if adapter.base_fingerprint != runtime.base.fingerprint:
        raise _invalid(("model",), f"adapter {adapter.id} was made for base model {adapter.base_fingerprint}, "
                                   f"this server runs {runtime.base.fingerprint}")
    try:
        files = runtime.storage.read_all(adapter_key(adapter.id))
    except NotStored:  # deleted since the lookup
        raise openai_refusal(404, f"model: adapter {adapter.id!r} was deleted", param="model",
                             code="model_not_found") from None
    method = "prefix_tuning" if adapter_files.is_prefix_tuning(files) else "prompt_tuning"
    defaults = {"method": method, "num_virtual_tokens": adapter.num_virtual_tokens}
    return adapter, defaults | ({"template": adapter.template} if adapter.template else {})


def _check_warm_start(adapter: Adapter, defaults: dict, config: TrainConfig) -> None:
    """A job continues an adapter with the same method and size, or not at all."""
    for field in ("method", "num_virtual_tokens"):
        if getattr(config, field) != defaults[field]:
            raise _invalid(("softserve", field), f"continuing from adapter {adapter.id} ({defaults[field]}) "
                                                 f"needs the same {field}; leave it out to use the adapter's")
    if config.prefix_projection:
        raise _invalid(("softserve", "prefix_projection"), f"continuing from adapter {adapter.id}: its prefix is "
                                                           "trained as it is, there is no projection to continue")


def _as_sent(error: dict, locations: dict[str, tuple], values: dict) -> dict:
    """A TrainConfig error, located where the client gave the field (the learning rate: its multiplier)."""
    field = str(error["loc"][0])
    if field == "learning_rate":
        error = error | {"msg": f"gives a learning rate of {values[field]:g}, which {error['msg'].lower()}"}
    return error | {"loc": ("body", *locations.get(field, ("softserve", *error["loc"])))}


def _train_config(body: FineTuningJobCreate, defaults: dict, runtime: Runtime) -> TrainConfig:
    """softserve's configuration of the job: the adapter's defaults, the softserve object, then
    OpenAI's fields. A rule broken is a 422 naming the field as the client sent it."""
    hyperparameters, where = body.given_hyperparameters()
    values = defaults | (body.softserve.model_dump(exclude_unset=True) if body.softserve else {})
    if hyperparameters.n_epochs != "auto":
        values["epochs"] = hyperparameters.n_epochs
    if hyperparameters.batch_size != "auto":
        values["batch_size"] = hyperparameters.batch_size
    if hyperparameters.learning_rate_multiplier != "auto":
        method = values.get("method", TrainConfigBase.model_fields["method"].default)
        values["learning_rate"] = hyperparameters.learning_rate_multiplier * DEFAULT_LEARNING_RATES[method]
    if body.seed is not None:
        values["seed"] = body.seed
    locations = {"seed": ("seed",), "epochs": (*where, "n_epochs"), "batch_size": (*where, "batch_size"),
                 "learning_rate": (*where, "learning_rate_multiplier")}
    try:
        config = TrainConfig(**values)
    except ValidationError as exc:
        raise RequestValidationError([_as_sent(error, locations, values) for error in exc.errors(
            include_url=False, include_input=False)]) from None
    if config.num_virtual_tokens > runtime.settings.max_virtual_tokens:
        raise _invalid(("softserve", "num_virtual_tokens"), f"must be at most {runtime.settings.max_virtual_tokens}")
    return config


@router.post(
    "",
    response_model=FineTuningJob,
    dependencies=[AdminAuth],
    responses={400: {"description": "The body is not JSON"}, 404: {"description": "Unknown model (adapter) or file"},
               422: {"description": "Invalid field (named), or an adapter to continue that does not fit the job"},
               503: {"description": "The job queue (broker) is unreachable; nothing was stored"}},
)
def create_fine_tuning_job(body: FineTuningJobCreate, runtime: RuntimeDep, session: SessionDep) -> FineTuningJob:
    """Queue a fine-tuning job (admin) on uploaded files: prompt tuning by default, or what the
    `softserve` object asks for. With `model` an adapter, the job starts from its prompt (same
    method and num_virtual_tokens; both, and the template, default to the adapter's). A
    `metadata.webhook_url` is told when the job ends or pauses, if its host is allowed
    (WEBHOOK_ALLOWED_HOSTS); 422 saying why not otherwise."""
    webhook_url = (body.metadata or {}).get(METADATA_URL_KEY)
    if webhook_url is not None and (problem := webhook_url_problem(webhook_url, runtime.settings)):
        raise _invalid(("metadata", METADATA_URL_KEY), f"webhook_url: {problem}")
    adapter, defaults = _warm_start(runtime, session, body.model)
    config = _train_config(body, defaults, runtime)
    if adapter is not None:
        _check_warm_start(adapter, defaults, config)
    training = _uploaded(session, body.training_file, "training_file")
    validation = _uploaded(session, body.validation_file, "validation_file") if body.validation_file else None
    if validation is not None and validation.format != training.format:
        raise _invalid(("validation_file",), f"holds {validation.format} examples, the training file {training.format} ones")
    try:
        train = uploaded_files.read_data(runtime.storage, training)
        held_out = uploaded_files.read_data(runtime.storage, validation) if validation else None
    except NotStored:  # deleted since the lookup
        raise openai_refusal(404, "a file was deleted meanwhile", param="training_file", code="file_not_found") from None
    job = store_and_queue(runtime, body.suffix, config, train, held_out, suffix=body.suffix, job_metadata=body.metadata,
                          training_file=training.id, validation_file=validation.id if validation else None,
                          base_adapter_id=adapter.id if adapter else None)
    return fine_tuning_job(job, runtime.base.name)


def _get_or_404(session: Session, job_id: str, param: str = "fine_tuning_job_id") -> TrainJob:
    job = jobs.get_job(session, job_id)
    if job is None:
        raise openai_refusal(404, f"no such fine-tuning job: {job_id!r}", param=param,
                             code="fine_tuning_job_not_found")
    return job


@router.get("", response_model=FineTuningJobList, responses={404: {"description": "The `after` cursor names no job"}})
def list_fine_tuning_jobs(
    runtime: RuntimeDep, session: SessionDep,
    after: Annotated[str | None, Query(max_length=32, description="A job id: list the jobs older than it")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """Every training job, newest first, however it was made (here or through /train-jobs)."""
    cursor = _get_or_404(session, after, "after") if after is not None else None
    found = jobs.list_jobs_after(session, after=cursor, limit=limit + 1)
    return FineTuningJobList(data=[fine_tuning_job(job, runtime.base.name) for job in found[:limit]],
                             has_more=len(found) > limit)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob, responses={404: {"description": "Unknown job"}})
def retrieve_fine_tuning_job(fine_tuning_job_id: JobId, runtime: RuntimeDep, session: SessionDep) -> FineTuningJob:
    return fine_tuning_job(_get_or_404(session, fine_tuning_job_id), runtime.base.name)


@router.post(
    "/{fine_tuning_job_id}/cancel",
    response_model=FineTuningJob,
    status_code=status.HTTP_200_OK,
    dependencies=[AdminAuth],
    responses={404: {"description": "Unknown job"}, 409: {"description": "The job has already ended"}},
)
def cancel_fine_tuning_job(fine_tuning_job_id: JobId, runtime: RuntimeDep, session: SessionDep) -> FineTuningJob:
    """Cancel (admin): a queued job at once; a running one stops within a few steps."""
    job = _get_or_404(session, fine_tuning_job_id)
    if job.status in TERMINAL:
        raise openai_refusal(409, f"job {job.id} has already {job.status}", param="fine_tuning_job_id")
    jobs.cancel(session, job.id)
    session.expire_all()
    return fine_tuning_job(_get_or_404(session, job.id), runtime.base.name)


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=FineTuningJobEventList,
    responses={404: {"description": "Unknown job"}, 422: {"description": "`after` is not an event id"}},
)
def list_fine_tuning_events(
    fine_tuning_job_id: JobId, session: SessionDep,
    after: Annotated[str | None, Query(max_length=32, pattern=rf"^{EVENT_PREFIX}[0-9]{{1,10}}$", description=(
        "An event id: list the events older than it"), examples=["ftevent-42"])] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 20,
) -> FineTuningJobEventList:
    """The job's history, newest first: `metrics` events (training loss at each step, validation
    loss and accuracy at each evaluation) and `message` events (queued, started, ended...)."""
    job = _get_or_404(session, fine_tuning_job_id)
    before = int(after.removeprefix(EVENT_PREFIX)) if after is not None else None
    found = jobs.list_events_newest_first(session, job.id, before_id=before, limit=limit + 1)
    return FineTuningJobEventList(data=[fine_tuning_event(event, job) for event in found[:limit]],
                                  has_more=len(found) > limit)


@router.post(
    "/{fine_tuning_job_id}/pause",
    response_model=FineTuningJob,
    dependencies=[AdminAuth],
    responses={404: {"description": "Unknown job"}, 409: {"description": "The job is neither queued nor running"}},
)
def pause_fine_tuning_job(fine_tuning_job_id: JobId, runtime: RuntimeDep, session: SessionDep) -> FineTuningJob:
    """Pause (admin): a queued job at once; a running one stops at its next step boundary, saves
    its state to shared storage and releases its device (`softserve.pause_requested` until then)."""
    job = _get_or_404(session, fine_tuning_job_id)
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise openai_refusal(409, f"job {job.id} is {job.status}: only a queued or running job can be paused",
                             param="fine_tuning_job_id")
    jobs.request_pause(session, job.id)
    session.expire_all()
    return fine_tuning_job(_get_or_404(session, job.id), runtime.base.name)


@router.post(
    "/{fine_tuning_job_id}/resume",
    response_model=FineTuningJob,
    dependencies=[AdminAuth],
    responses={404: {"description": "Unknown job"}, 409: {"description": "The job is not paused"}},
)
def resume_fine_tuning_job(fine_tuning_job_id: JobId, runtime: RuntimeDep, session: SessionDep) -> FineTuningJob:
    """Queue a paused job again (admin): any node goes on from its saved state, to the result it
    would have reached without the pause."""
    job = _get_or_404(session, fine_tuning_job_id)
    if not jobs.resume(session, job.id):
        raise openai_refusal(409, f"job {job.id} is {job.status}: only a paused job can be resumed",
                             param="fine_tuning_job_id")
    try:
        runtime.enqueue_training(job.id)
    except Exception:  # queued all the same: job upkeep sends its message once the broker answers
        log.exception("job %s resumed, but its message could not be sent yet", job.id)
    session.expire_all()
    return fine_tuning_job(_get_or_404(session, job.id), runtime.base.name)


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=FineTuningJobCheckpointList,
    responses={404: {"description": "Unknown job, or an `after` that is none of its checkpoints"}},
)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: JobId, runtime: RuntimeDep, session: SessionDep,
    after: Annotated[str | None, Query(max_length=48, description=(
        "A checkpoint id: list the checkpoints older than it"), examples=["ftckpt-7c1e04a9b2d3"])] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointList:
    """The adapters stored at evaluations that improved the job's best result, newest first, each
    servable at once by its `fine_tuned_model_checkpoint` name while the job still runs. Once the
    job ends, only the last three and the best are kept."""
    job = _get_or_404(session, fine_tuning_job_id)
    found = jobs.list_checkpoints(session, job.id)  # a handful: kept few by pruning
    if after is not None:
        ids = [checkpoint.id for checkpoint in found]
        if after not in ids:
            raise openai_refusal(404, f"job {job.id} has no checkpoint {after!r}", param="after")
        found = found[ids.index(after) + 1:]
    data = [fine_tuning_checkpoint(checkpoint, job, runtime.base.name) for checkpoint in found[:limit]]
    return FineTuningJobCheckpointList(data=data, has_more=len(found) > limit, first_id=data[0].id if data else None,
                                       last_id=data[-1].id if data else None)
