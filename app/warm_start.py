"""Warm start: a job that starts from an existing adapter's values (a checkpoint, or any adapter)
instead of its init. The adapter must fit the job: made for this base model, the same PEFT
method and number of virtual tokens, and for a prefix no reparameterization MLP (the adapter
keeps the prefix it serves, not PEFT's encoder). The API checks this when the job is made; the
run checks it again when it starts, since the adapter may have gone meanwhile."""

import torch
from sqlalchemy.orm import Session

from app import adapter_files, registry
from app.engine.loader import BaseModel
from app.storage import NotStored, Storage, adapter_key
from app.train_config import Method


class WarmStartError(ValueError):
    """The adapter cannot start this job; the message says why."""


def warm_start_values(session: Session, storage: Storage, base: BaseModel, adapter_id: str, method: Method,
                      num_virtual_tokens: int, prefix_projection: bool = False) -> torch.Tensor:
    """The adapter's values as it serves them: a soft prompt [n, hidden] or a flattened prefix
    [n, layers * 2 * kv_heads * head_dim] (app.engine.prefix_kv.from_flat reads it). WarmStartError if it does not fit."""
    adapter = registry.get_adapter(session, adapter_id)
    if adapter is None:
        raise WarmStartError(f"adapter {adapter_id!r} to start from does not exist")
    if adapter.base_fingerprint != base.fingerprint:
        raise WarmStartError(f"adapter {adapter_id} was made for base model {adapter.base_fingerprint}; "
                             f"this server runs {base.fingerprint}")
    try:
        values, is_prefix = adapter_files.read_served(storage.read_all(adapter_key(adapter_id)))
    except NotStored:
        raise WarmStartError(f"adapter {adapter_id!r} to start from does not exist") from None
    kind = "prefix_tuning" if is_prefix else "prompt_tuning"
    if kind != method:
        raise WarmStartError(f"adapter {adapter_id} is {kind}; the job asks for {method}")
    if values.shape[0] != num_virtual_tokens:
        raise WarmStartError(f"adapter {adapter_id} has {values.shape[0]} virtual tokens; "
                             f"the job asks for {num_virtual_tokens}")
    if prefix_projection:
        raise WarmStartError("a warm start trains the adapter's prefix directly: prefix_projection must be off")
    return values


def warm_start_problem(session: Session, storage: Storage, base: BaseModel, adapter_id: str, method: Method,
                       num_virtual_tokens: int, prefix_projection: bool = False) -> str | None:
    """Why the adapter cannot start such a job (for a 422), or None if it can."""
    try:
        warm_start_values(session, storage, base, adapter_id, method, num_virtual_tokens, prefix_projection)
    except WarmStartError as exc:
        return str(exc)
    return None
