"""The adapter registry: database rows, their files in shared storage (app.storage).

Storage keys are always made by the server from the adapter id; nothing a client sends becomes
one. A row exists only once its files are stored: both are committed together, or neither is.
"""

from typing import Literal

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import adapter_files
from app.db import get_by_id, paginate
from app.models import Adapter, new_id
from app.storage import Storage, adapter_key

CHECKPOINT = "checkpoint"  # the source of a job's checkpoint adapters (worker.job_runner)


def new_adapter(
    *,
    name: str,
    prompt_embeddings: torch.Tensor,
    base_fingerprint: str,
    base_model_name: str,
    source: str,
    metrics: dict | None = None,
    template: str | None = None,
    original_files: dict[str, bytes] | None = None,
) -> tuple[Adapter, dict[str, bytes]]:
    """A new adapter's row (not yet in any session) and its files, to store with
    `storage.storing(session, adapter_key(row.id), files)` in the transaction that adds the row.
    `original_files`: an imported P_TUNING or MULTITASK_PROMPT_TUNING adapter's own, kept for download."""
    files = adapter_files.stored_files(prompt_embeddings, base_fingerprint, base_model_name, original_files)
    adapter = Adapter(
        id=new_id(),
        name=name,
        base_fingerprint=base_fingerprint,
        num_virtual_tokens=int(prompt_embeddings.shape[0]),
        sha256=adapter_files.content_sha256(prompt_embeddings),
        size_bytes=sum(len(data) for data in files.values()),
        source=source,
        metrics=metrics or {},
        template=template,
    )
    return adapter, files


def register_adapter(session: Session, *, storage: Storage, **fields) -> Adapter:
    """Store the adapter's files and commit its row, together."""
    adapter, files = new_adapter(**fields)
    with storage.storing(session, adapter_key(adapter.id), files):
        session.add(adapter)
        session.commit()
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
                  offset: int = 0, include_checkpoints: bool = False) -> tuple[list[Adapter], int]:
    """A page of adapters. A job's checkpoints are listed with their job (app.jobs.list_checkpoints),
    not here unless asked: each job keeps up to four, and they go when it ends."""
    query = select(Adapter)
    if not include_checkpoints:
        query = query.where(Adapter.source != CHECKPOINT)
    if name:
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Adapter.name.ilike(f"%{escaped}%", escape="\\"))
    return paginate(session, query, *_order_by(sort), limit=limit, offset=offset)


def count_by_source(session: Session) -> dict[str, int]:
    """How many adapters were trained here and how many imported."""
    return dict(session.execute(select(Adapter.source, func.count()).group_by(Adapter.source)).all())


def delete_adapter(session: Session, *, storage: Storage, adapter: Adapter) -> None:
    """Delete the row and its files, together (a directory's files just after the row)."""
    with storage.deleting(session, adapter_key(adapter.id)):
        session.delete(adapter)
        session.commit()
