"""Files uploaded through OpenAI's `POST /v1/files`: a registry row (UploadedFile) and the
dataset it holds, normalised as training stores datasets (app.datasets), in shared storage under a
server-made key. Row and data are committed together, and deleted together."""

import secrets

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.datasets import dataset_format
from app.db import get_by_id
from app.job_status import TERMINAL
from app.jobs import storable
from app.models import TrainJob, UploadedFile
from app.storage import Storage, file_key

DATA_NAME = "data.jsonl"
FILENAME_MAX = 255  # the column's width


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def store_file(session: Session, storage: Storage, *, purpose: str, filename: str, normalised: bytes) -> UploadedFile:
    """Store a validated dataset and its row, together."""
    file_id = new_file_id()
    row = UploadedFile(id=file_id, purpose=purpose, filename=storable(filename, FILENAME_MAX), bytes=len(normalised),
                       examples=normalised.count(b"\n"), format=dataset_format(normalised), storage_key=file_key(file_id))
    with storage.storing(session, row.storage_key, {DATA_NAME: normalised}):
        session.add(row)
        session.commit()
    return row


def get_file(session: Session, file_id: str) -> UploadedFile | None:
    return get_by_id(session, UploadedFile, file_id)


def list_files(session: Session, *, purpose: str | None, after: UploadedFile | None, limit: int,
               newest_first: bool) -> list[UploadedFile]:
    """Up to `limit` files in order of upload (ties by id), those past the `after` cursor only."""
    query = select(UploadedFile)
    if purpose is not None:
        query = query.where(UploadedFile.purpose == purpose)
    if after is not None:
        if newest_first:
            past = or_(UploadedFile.created_at < after.created_at,
                       (UploadedFile.created_at == after.created_at) & (UploadedFile.id < after.id))
        else:
            past = or_(UploadedFile.created_at > after.created_at,
                       (UploadedFile.created_at == after.created_at) & (UploadedFile.id > after.id))
        query = query.where(past)
    order = (UploadedFile.created_at.desc(), UploadedFile.id.desc()) if newest_first else (
        UploadedFile.created_at, UploadedFile.id)
    return list(session.scalars(query.order_by(*order).limit(limit)))


def jobs_using(session: Session, file_id: str) -> list[str]:
    """The jobs not yet ended (queued, running or paused) that name the file as training or validation data."""
    query = select(TrainJob.id).where(or_(TrainJob.training_file == file_id, TrainJob.validation_file == file_id),
                                      TrainJob.status.not_in(TERMINAL))
    return list(session.scalars(query.order_by(TrainJob.created_at)))


def read_data(storage: Storage, row: UploadedFile) -> bytes:
    """The file's normalised dataset (NotStored if it was deleted meanwhile)."""
    return storage.read(row.storage_key, DATA_NAME)


def delete_file(session: Session, storage: Storage, row: UploadedFile) -> None:
    """Delete the row and its data, together."""
    with storage.deleting(session, row.storage_key):
        session.delete(row)
        session.commit()
