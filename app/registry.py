"""The adapter registry: database rows plus their files under the data folder.

Paths are always made by the server from the adapter id; nothing a client sends becomes a path.
A row exists only once its file is fully written, and a failed insert removes the file.
"""

import shutil
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import adapter_files
from app.db import paginate
from app.models import Adapter, new_id


def adapter_dir(adapters_dir: Path, adapter_id: str) -> Path:
    return adapters_dir / adapter_id


def register_adapter(
    session: Session,
    *,
    adapters_dir: Path,
    name: str,
    prompt_embeddings: torch.Tensor,
    base_fingerprint: str,
    base_model_name: str,
    source: str,
    metrics: dict | None = None,
    template: str | None = None,
) -> Adapter:
    """Write the adapter's files, then add and commit its row."""
    adapter_id = new_id()
    directory = adapter_dir(adapters_dir, adapter_id)
    sha256, size = adapter_files.write_adapter(directory, prompt_embeddings, base_fingerprint, base_model_name)
    adapter = Adapter(
        id=adapter_id,
        name=name,
        base_fingerprint=base_fingerprint,
        num_virtual_tokens=int(prompt_embeddings.shape[0]),
        sha256=sha256,
        size_bytes=size,
        source=source,
        metrics=metrics or {},
        template=template,
    )
    try:
        session.add(adapter)
        session.commit()
    except BaseException:
        session.rollback()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return adapter


def get_adapter(session: Session, adapter_id: str) -> Adapter | None:
    return session.get(Adapter, adapter_id)


def list_adapters(session: Session, *, name: str | None = None, limit: int = 20, offset: int = 0) -> tuple[list[Adapter], int]:
    query = select(Adapter)
    if name:
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Adapter.name.ilike(f"%{escaped}%", escape="\\"))
    return paginate(session, query, Adapter.created_at.desc(), Adapter.id, limit=limit, offset=offset)


def delete_adapter(session: Session, *, adapters_dir: Path, adapter: Adapter) -> None:
    """Delete the row, then the files: a stale folder is harmless, a row without a file is not."""
    session.delete(adapter)
    session.commit()
    shutil.rmtree(adapter_dir(adapters_dir, adapter.id), ignore_errors=True)
