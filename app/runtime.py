"""What one API process holds: settings, the resident model, the registry's sessions, the
adapter cache and the batch scheduler. Built once in the app's lifespan."""

import asyncio
from dataclasses import dataclass
from functools import partial

import torch
from sqlalchemy.orm import Session, sessionmaker

from app import adapter_files, registry
from app.config import Settings
from app.engine.adapter_cache import AdapterCache
from app.engine.generation import generate_batch
from app.engine.loader import BaseModel
from app.engine.scheduler import BatchScheduler


class AdapterNotFound(LookupError):
    pass


class AdapterBaseMismatch(ValueError):
    pass


@dataclass
class Runtime:
    settings: Settings
    base: BaseModel
    sessions: sessionmaker[Session]
    cache: AdapterCache
    scheduler: BatchScheduler

    @classmethod
    def build(cls, settings: Settings, base: BaseModel, sessions: sessionmaker[Session]) -> "Runtime":
        return cls(
            settings=settings,
            base=base,
            sessions=sessions,
            cache=AdapterCache(settings.adapter_cache_size, base.device, base.embed_dtype),
            scheduler=BatchScheduler(
                partial(generate_batch, base),
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_batch_wait_ms,
                max_queue_size=settings.max_queue_size,
            ),
        )

    def _lookup_fingerprint(self, adapter_id: str) -> str | None:
        with self.sessions() as session:
            adapter = registry.get_adapter(session, adapter_id)
            return adapter.base_fingerprint if adapter else None

    async def soft_prompt(self, adapter_id: str) -> torch.Tensor:
        """The adapter's prompt embeddings on the model's device. The registry is checked on
        every request, so a deleted adapter stops being served at once."""
        fingerprint = await asyncio.to_thread(self._lookup_fingerprint, adapter_id)
        if fingerprint is None:
            raise AdapterNotFound(adapter_id)
        if fingerprint != self.base.fingerprint:
            raise AdapterBaseMismatch(
                f"adapter {adapter_id} was made for base model {fingerprint}, this server runs {self.base.fingerprint}"
            )
        directory = registry.adapter_dir(self.settings.adapters_dir, adapter_id)
        try:
            return await self.cache.get(adapter_id, partial(adapter_files.read_prompt_embeddings, directory))
        except FileNotFoundError:  # deleted between the lookup and the load
            raise AdapterNotFound(adapter_id) from None
