"""OpenAI's Files API for fine-tuning data: `POST /v1/files` (multipart `file`, `purpose=fine-tune`),
list, retrieve, content, delete. An upload is validated as `POST /train-jobs` validates datasets
(same rules and caps, read in a process of its own) and stored normalised, one example a line,
in shared storage (app.uploaded_files); a bad one is refused with 400 naming its lines, and
nothing is stored. Its content is that normalised JSONL, which is also what `bytes` counts.

Auth: uploading and deleting need an admin key; an inference key may list and read the files'
descriptions, but not their content, which is training data."""

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app import datasets, uploaded_files
from app.api.deps import RuntimeDep, SessionDep
from app.api.openai_errors import OpenAIErrorRoute, openai_refusal
from app.api.uploads import FileField, admin_form, openapi_form
from app.auth import AdminAuth
from app.models import UploadedFile
from app.runtime import Runtime
from app.storage import NotStored

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=OpenAIErrorRoute)

FileId = Annotated[str, Path(description="File id", examples=["file-3f9a1c2b7d4e5a6b7c8d9e0f"])]
EXAMPLE = {"id": "file-3f9a1c2b7d4e5a6b7c8d9e0f", "object": "file", "bytes": 140, "created_at": 1796014800,
           "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed", "status_details": None,
           "expires_at": None}


# The upload. (No docstring: pydantic would show it in the API's docs.)
class FileUploadForm(BaseModel):
    file: Annotated[FileField, Field(description=(
        'Training data: JSONL of {"input", "output"} (or {"prompt", "completion"}) objects, or CSV with those columns'))]
    purpose: Annotated[Literal["fine-tune"], Field(description="What the file is for: fine-tune only",
                                                   examples=["fine-tune"])]


class FileObject(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})

    id: str
    object: Literal["file"] = "file"
    bytes: int = Field(description="Size of the stored (normalised) dataset")
    created_at: int = Field(description="Unix time")
    filename: str
    purpose: str
    status: Literal["processed"] = Field("processed", description="Files are validated on upload: always processed")
    status_details: None = None
    expires_at: None = None


class FileList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [EXAMPLE], "has_more": False}]})

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "file-3f9a1c2b7d4e5a6b7c8d9e0f", "object": "file", "deleted": True}]})

    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_object(row: UploadedFile) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=int(row.created_at.timestamp()), filename=row.filename,
                      purpose=row.purpose)


def _get_or_404(session, file_id: str, param: str = "file_id") -> UploadedFile:
    row = uploaded_files.get_file(session, file_id)
    if row is None:
        raise openai_refusal(404, f"no such file: {file_id!r}", param=param, code="file_not_found")
    return row


@router.post(
    "",
    response_model=FileObject,
    openapi_extra=openapi_form(FileUploadForm),
    responses={400: {"description": "Malformed multipart body, or an invalid dataset (its bad lines named)"},
               413: {"description": "Upload too large"}, 415: {"description": "Not multipart/form-data"},
               422: {"description": "A missing field, or a purpose other than fine-tune"}},
)
async def create_file(
    runtime: RuntimeDep,
    form: Annotated[FileUploadForm, Depends(admin_form(FileUploadForm, lambda s: s.max_dataset_bytes))],
) -> FileObject:
    """Upload a dataset for fine-tuning (admin). It is checked whole before anything is stored:
    a bad line gets 400 naming it (up to 20 lines are listed)."""
    settings = runtime.settings
    try:
        normalised = await datasets.normalise_elsewhere(form.file.data, "file", form.file.filename,
                                                        settings.max_train_examples, settings.dataset_parse_budget_s)
    except datasets.DatasetError as exc:
        raise openai_refusal(400, str(exc), param="file", code="invalid_file") from None
    row = await asyncio.to_thread(_store, runtime, form.file.filename, normalised)
    return file_object(row)


def _store(runtime: Runtime, filename: str, normalised: bytes) -> UploadedFile:
    with runtime.sessions() as session:
        return uploaded_files.store_file(session, runtime.storage, purpose="fine-tune", filename=filename,
                                         normalised=normalised)


@router.get("", response_model=FileList, responses={404: {"description": "The `after` cursor names no file"}})
def list_files(
    session: SessionDep,
    purpose: Annotated[str | None, Query(max_length=32, description="Only files of this purpose")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="By upload time")] = "desc",
    after: Annotated[str | None, Query(max_length=40, description="A file id: list the files past it")] = None,
) -> FileList:
    cursor = _get_or_404(session, after, "after") if after is not None else None
    rows = uploaded_files.list_files(session, purpose=purpose, after=cursor, limit=limit + 1,
                                     newest_first=order == "desc")
    return FileList(data=[file_object(row) for row in rows[:limit]], has_more=len(rows) > limit)


@router.get("/{file_id}", response_model=FileObject, responses={404: {"description": "Unknown file"}})
def retrieve_file(file_id: FileId, session: SessionDep) -> FileObject:
    return file_object(_get_or_404(session, file_id))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    dependencies=[AdminAuth],
    responses={200: {"content": {"application/octet-stream": {"example": '{"input": "a fine film", "output": "positive"}\n'}},
                     "description": "The dataset as stored: normalised JSONL, an example a line"},
               404: {"description": "Unknown file"}},
)
def retrieve_file_content(file_id: FileId, session: SessionDep, runtime: RuntimeDep) -> Response:
    """The file's data (admin: it is training data)."""
    row = _get_or_404(session, file_id)
    try:
        data = uploaded_files.read_data(runtime.storage, row)
    except NotStored:  # deleted since the lookup, by another request or node
        raise openai_refusal(404, f"no such file: {file_id!r}", param="file_id", code="file_not_found") from None
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{row.id}.jsonl"'})


@router.delete(
    "/{file_id}",
    response_model=FileDeleted,
    dependencies=[AdminAuth],
    responses={404: {"description": "Unknown file"},
               409: {"description": "A job not yet ended (queued, running or paused) uses the file"}},
)
def delete_file(file_id: FileId, session: SessionDep, runtime: RuntimeDep) -> FileDeleted:
    """Delete the file and its data (admin); refused while a job that has not ended names it."""
    row = _get_or_404(session, file_id)
    users = uploaded_files.jobs_using(session, file_id)
    if users:
        raise openai_refusal(409, f"file {file_id} is used by fine-tuning job {users[0]}, which has not ended; "
                                  "cancel it or wait for it to end", param="file_id", code="file_in_use")
    uploaded_files.delete_file(session, runtime.storage, row)
    return FileDeleted(id=file_id, deleted=True)
