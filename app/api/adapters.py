"""Adapter registry routes: upload, list, inspect, download, delete."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from pydantic import BaseModel, Field

from app import adapter_files, jobs, registry
from app.api.deps import AdapterId, RuntimeDep, SessionDep
from app.api.uploads import FileField, UploadedFile, admin_form, openapi_form
from app.auth import AdminAuth
from app.db import MAX_OFFSET
from app.models import Adapter
from app.schemas import AdapterOut, AdapterPage, NoNul
from app.storage import NotStored, adapter_key

router = APIRouter(prefix="/adapters", tags=["adapters"])


class AdapterUploadForm(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=200, description="Display name", examples=["sst2-sentiment"]), NoNul]
    config: Annotated[FileField | None, Field(description="adapter_config.json")] = None
    weights: Annotated[FileField | None, Field(description="adapter_model.safetensors")] = None
    archive: Annotated[FileField | None, Field(description="A zip holding both files instead")] = None
    task_id: Annotated[int | None, Field(ge=0, le=1_000_000, description=(
        "MULTITASK_PROMPT_TUNING only: which task's prompt to serve (default 0)"))] = None


def _data(upload: UploadedFile | None, field: str) -> bytes | None:
    if upload is not None and not upload.data:
        raise HTTPException(422, detail=f"{field}: file is empty")
    return upload.data if upload else None


def _get_or_404(session, adapter_id: str) -> Adapter:
    adapter = registry.get_adapter(session, adapter_id)
    if adapter is None:
        raise HTTPException(404, detail=f"adapter {adapter_id!r} not found")
    return adapter


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=AdapterOut,
    dependencies=[AdminAuth],
    openapi_extra=openapi_form(AdapterUploadForm),
    responses={400: {"description": "Malformed multipart body"}, 409: {"description": "Adapter made for another base model"},
               413: {"description": "Upload too large"}, 415: {"description": "Not multipart/form-data"},
               422: {"description": "Not a valid prompt-tuning adapter; the message names the file and problem"}},
)
async def upload_adapter(
    runtime: RuntimeDep,
    session: SessionDep,
    form: Annotated[AdapterUploadForm, Depends(admin_form(AdapterUploadForm, lambda s: s.max_adapter_upload_bytes))],
) -> Adapter:
    """Import a PEFT soft-prompt adapter (`PROMPT_TUNING`, `P_TUNING`, `MULTITASK_PROMPT_TUNING` or
    `PREFIX_TUNING`): `config` + `weights`, or one zip as `archive`. P-tuning and multitask adapters
    are served as the fixed soft prompt they amount to, prefix tuning as its per-layer keys and
    values; every kind downloads as uploaded."""
    settings, base = runtime.settings, runtime.base
    config, weights, archive = _data(form.config, "config"), _data(form.weights, "weights"), _data(form.archive, "archive")
    try:  # off the event loop: a zip's directory and members take real work to read
        config_bytes, weights_bytes = await asyncio.to_thread(
            adapter_files.split_upload, config, weights, archive, settings.max_adapter_upload_bytes
        )
        parsed = await asyncio.to_thread(
            adapter_files.parse_adapter, config_bytes, weights_bytes, base.hidden_size, base.kv_shape,
            settings.max_virtual_tokens, base.fingerprint, form.task_id,
        )
    except adapter_files.AdapterFormatError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except adapter_files.BaseModelMismatch as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return await asyncio.to_thread(
        registry.register_adapter,
        session,
        storage=runtime.storage,
        name=form.name,
        prompt_embeddings=parsed.prompt_embeddings,
        base_fingerprint=parsed.base_fingerprint,
        base_model_name=parsed.base_model_name or base.name,
        source="imported",
        original_files=parsed.original_files,
    )


@router.get("", response_model=AdapterPage)
def list_adapters(
    session: SessionDep,
    name: Annotated[str | None, Query(max_length=200, description="Case-insensitive substring of the name"), NoNul] = None,
    sort: Annotated[registry.AdapterSort, Query(description='A column; a leading "-" sorts descending')] = registry.DEFAULT_SORT,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> AdapterPage:
    items, total = registry.list_adapters(session, name=name, sort=sort, limit=limit, offset=offset)
    return AdapterPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{adapter_id}", response_model=AdapterOut, responses={404: {"description": "Unknown adapter"}})
def get_adapter(adapter_id: AdapterId, session: SessionDep) -> Adapter:
    return _get_or_404(session, adapter_id)


@router.get(
    "/{adapter_id}/download",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}, 404: {"description": "Unknown adapter"}},
)
def download_adapter(adapter_id: AdapterId, session: SessionDep, runtime: RuntimeDep) -> Response:
    """The adapter as a PEFT-format zip (`adapter_config.json` + `adapter_model.safetensors`)."""
    adapter = _get_or_404(session, adapter_id)
    try:
        files = runtime.storage.read_all(adapter_key(adapter.id))
    except NotStored:  # deleted since the lookup, by another request or node
        raise HTTPException(404, detail=f"adapter {adapter_id!r} not found") from None
    data = adapter_files.zip_adapter(files)
    return Response(
        data,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="adapter-{adapter.id}.zip"'},
    )


@router.delete(
    "/{adapter_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[AdminAuth],
    responses={404: {"description": "Unknown adapter"},
               409: {"description": "A job not yet ended (queued, running or paused) will start from it"}},
)
def delete_adapter(adapter_id: AdapterId, session: SessionDep, runtime: RuntimeDep) -> None:
    adapter = _get_or_404(session, adapter_id)
    if job_id := jobs.job_starting_from(session, adapter.id):
        raise HTTPException(409, detail=f"adapter {adapter.id} is the starting point of job {job_id}, which has "
                                        "not ended; cancel the job or wait for it to end first")
    registry.delete_adapter(session, storage=runtime.storage, adapter=adapter)
    runtime.forget_adapter(adapter_id)
