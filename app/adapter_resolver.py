"""Adapter resolution: from an adapter id to the soft prompt the engine serves, through the
registry and the adapter cache.

The registry is checked on every request, so a deleted adapter stops being served at once, and
the cache is keyed by id and content hash, so a replaced one is never served stale. Only an
adapter made for the resident base model (same fingerprint) is served.
"""

import asyncio
import time
from dataclasses import dataclass
from functools import partial

from sqlalchemy.orm import Session, sessionmaker

from app import adapter_files, registry
from app.engine import prefix_kv
from app.engine.adapter_cache import AdapterCache
from app.engine.loader import BaseModel
from app.engine.requests import SoftPrompt
from app.storage import NotStored, Storage, adapter_key


class AdapterNotFound(LookupError):
    pass


class AdapterBaseMismatch(ValueError):
    pass


@dataclass
class AdapterResolver:
    base: BaseModel
    sessions: sessionmaker[Session]
    storage: Storage
    cache: AdapterCache
    lookups: int = 0
    lookup_seconds: float = 0.0  # wall time of the registry lookups every request makes

    async def soft_prompt(self, adapter_id: str) -> tuple[SoftPrompt, str | None]:
        """The adapter's prompt embeddings on the model's device, and its template."""
        started = time.perf_counter()
        found = await asyncio.to_thread(self._lookup, adapter_id)
        self.lookups += 1  # on the event loop: one writer
        self.lookup_seconds += time.perf_counter() - started
        if found is None:
            raise AdapterNotFound(adapter_id)
        fingerprint, sha256, template = found
        if fingerprint != self.base.fingerprint:
            raise AdapterBaseMismatch(
                f"adapter {adapter_id} was made for base model {fingerprint}, this server runs {self.base.fingerprint}"
            )
        try:
            soft_prompt = await self.cache.get((adapter_id, sha256), partial(self._read_prompt, adapter_id))
        except NotStored:  # deleted between the lookup and the load
            raise AdapterNotFound(adapter_id) from None
        return soft_prompt, template

    def stats(self) -> dict:
        return {"lookups": self.lookups, "lookup_seconds": round(self.lookup_seconds, 6)}

    def forget(self, adapter_id: str) -> None:
        """After a delete: drop its cached weights."""
        self.cache.evict(adapter_id)

    def _lookup(self, adapter_id: str) -> tuple[str, str, str | None] | None:
        with self.sessions() as session:
            adapter = registry.get_adapter(session, adapter_id)
            return (adapter.base_fingerprint, adapter.sha256, adapter.template) if adapter else None

    def _read_prompt(self, adapter_id: str) -> SoftPrompt:
        served, is_prefix = adapter_files.read_served(self.storage.read_all(adapter_key(adapter_id)))
        if is_prefix:
            return SoftPrompt.prefix(prefix_kv.from_flat(served, self.base.kv_shape), adapter_id)
        return SoftPrompt(served, adapter_id)
