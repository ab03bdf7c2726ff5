"""ORM models: the registry's tables."""

import secrets
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, TypeDecorator
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.job_status import JobStatus

ERROR_MESSAGE_MAX = 2000  # characters of a job's error message kept in the registry


def new_id() -> str:
    """Short, URL-safe, unguessable id."""
    return secrets.token_hex(6)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), index=True)
    base_fingerprint: Mapped[str] = mapped_column(String(200))
    num_virtual_tokens: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # "trained" or "imported"
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    template: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class TrainJob(Base):
    __tablename__ = "train_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED)  # a JobStatus
    params: Mapped[dict] = mapped_column(JSON)  # validated hyperparameters and template
    dataset_path: Mapped[str] = mapped_column(String(500))  # its storage key (app.storage), server-made
    train_examples: Mapped[int] = mapped_column(Integer)
    validation_examples: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[float] = mapped_column(Float, default=0.0)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(String(ERROR_MESSAGE_MAX), nullable=True)
    adapter_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    run_token: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the current claim's (fencing)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the last message for the queued job reached the broker; NULL: none has since it was queued.
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set by the OpenAI-shaped API (app.api.fine_tuning); NULL for jobs made through /train-jobs.
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    job_metadata: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # OpenAI's `metadata`
    training_file: Mapped[str | None] = mapped_column(String(40), nullable=True)  # a StoredUpload id
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    base_adapter_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # warm start from this adapter


class JobEvent(Base):
    """One point of the job's history: a loss value, an eval result or a message."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("train_jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "train", "eval" or "message"
    step: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobCheckpoint(Base):
    """An adapter stored at an evaluation that improved the job's best result: servable at once by
    its adapter id while the job still runs."""

    __tablename__ = "job_checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "ftckpt-<adapter id>"
    job_id: Mapped[str] = mapped_column(ForeignKey("train_jobs.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UploadedFile(Base):
    """A file uploaded through `POST /v1/files`: validated, stored in shared storage under `storage_key`."""

    __tablename__ = "uploaded_files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "file-<hex>"
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    examples: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))  # "completion" (input/output) or "chat" (messages)
    storage_key: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class WebhookDelivery(Base):
    """One job event on its way to one webhook URL, kept until delivered or given up."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the Standard Webhooks `webhook-id`: "msg_<hex>"
    job_id: Mapped[str] = mapped_column(ForeignKey("train_jobs.id", ondelete="CASCADE"), index=True)
    event_type: Mapped[str] = mapped_column(String(64))  # e.g. "fine_tuning.job.succeeded"
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApiKey(Base):
    """A credential. Only the SHA-256 of the key is stored; the key is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)  # public part of the key
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))  # "inference" or "admin"
    key_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AdminSession(Base):
    """A logged-in admin browser. Its signed cookie carries a random token and only the token's
    SHA-256 is stored: logout (or revoking the key) deletes the row, so a copied cookie dies with it."""

    __tablename__ = "admin_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ClusterSecret(Base):
    """A secret every node sharing the registry uses alike (the admin cookies' signing key):
    made once, by whichever node needs it first."""

    __tablename__ = "cluster_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StoredFile(Base):
    """One file in shared storage's database backend (app.storage): an adapter's weights or config,
    or an uploaded dataset, under a server-made key such as "adapters/<id>"."""

    __tablename__ = "stored_files"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
