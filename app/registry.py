"""The adapter registry: database rows plus their files under the data folder.

Paths are always made by the server from the adapter id; nothing a client sends becomes a path.
A row exists only once its file is fully written, and a failed insert removes the file.
"""

import shutil
from pathlib import Path
from typing import Literal

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import adapter_files
from app.db import get_by_id, paginate
from app.models import Adapter, new_id


def adapter_dir(adapters_dir: Path, adapter_id: str) -> Path:
    return adapters_dir / adapter_id


def new_adapter(
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
    """Write the adapter's files; return its row, not yet in any session. Whoever adds the row
    removes the files (remove_files) if it is not committed."""
    adapter_id = new_id()
    sha256, size = adapter_files.write_adapter(
        adapter_dir(adapters_dir, adapter_id), prompt_embeddings, base_fingerprint, base_model_name)
    return Adapter(
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


def remove_files(adapters_dir: Path, adapter_id: str) -> None:
    shutil.rmtree(adapter_dir(adapters_dir, adapter_id), ignore_errors=True)


def register_adapter(session: Session, *, adapters_dir: Path, **fields) -> Adapter:
    """Write the adapter's files, then add and commit its row."""
    adapter = new_adapter(adapters_dir=adapters_dir, **fields)
    try:
        session.add(adapter)
        session.commit()
    except BaseException:
        session.rollback()
        remove_files(adapters_dir, adapter.id)
        raise
    return adapter


def get_adapter(session: Session, adapter_id: str) -> Adapter | None:
    return get_by_id(session, Adapter, adapter_id)


# The columns the adapter list may be ordered by; a leading "-" means descending. Only these
# names reach SQL. eval_accuracy lives in the JSON metrics (absent for imported adapters).
SORT_COLUMNS = {
    "name": Adapter.name,
    "id": Adapter.id,
    "source": Adapter.source,
    "num_virtual_tokens": Adapter.num_virtual_tokens,
    "size_bytes": Adapter.size_bytes,
    "created_at": Adapter.created_at,
    "eval_accuracy": Adapter.metrics["eval_accuracy"].as_float(),
}
SORTS = tuple(prefix + column for column in SORT_COLUMNS for prefix in ("", "-"))
AdapterSort = Literal[SORTS]
DEFAULT_SORT = "-created_at"


def _order_by(sort: str) -> tuple:
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {SORTS}")
    name = sort.removeprefix("-")
    descending = sort != name
    primary = SORT_COLUMNS[name].desc() if descending else SORT_COLUMNS[name].asc()
    if name == "eval_accuracy":  # adapters without the metric go last either way
        primary = primary.nulls_last()
    # The id breaks ties in the same direction: pages are stable and a reversed sort is the exact reverse.
    return primary, Adapter.id.desc() if descending else Adapter.id.asc()


def list_adapters(session: Session, *, name: str | None = None, sort: str = DEFAULT_SORT, limit: int = 20,
                  offset: int = 0) -> tuple[list[Adapter], int]:
    query = select(Adapter)
    if name:
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Adapter.name.ilike(f"%{escaped}%", escape="\\"))
    return paginate(session, query, *_order_by(sort), limit=limit, offset=offset)


def count_by_source(session: Session) -> dict[str, int]:
    """How many adapters were trained here and how many imported."""
    return dict(session.execute(select(Adapter.source, func.count()).group_by(Adapter.source)).all())


def delete_adapter(session: Session, *, adapters_dir: Path, adapter: Adapter) -> None:
    """Delete the row, then the files: a stale folder is harmless, a row without a file is not."""
    session.delete(adapter)
    session.commit()
    remove_files(adapters_dir, adapter.id)
