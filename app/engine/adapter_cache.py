"""LRU cache of soft prompts on the model's device, keyed by adapter id and file hash, so an
adapter whose content changed is loaded afresh, never served from a stale entry.

Concurrent first uses of a cold adapter share one load (single flight); loading runs in a
thread so the event loop keeps serving.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress

import torch

from app.engine.requests import SoftPrompt

Key = tuple[str, str]  # (adapter id, sha256 of its files)


class AdapterCache:
    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype):
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self._entries: OrderedDict[Key, SoftPrompt] = OrderedDict()
        self._loading: dict[Key, asyncio.Future] = {}
        self.hits = 0
        self.misses = 0
        self.load_seconds = 0.0  # wall time of the misses' loads (blob read, decode, copy to the device)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def _load(self, load: Callable[[], SoftPrompt]) -> SoftPrompt:
        return load().to(self.device, self.dtype)

    async def get(self, key: Key, load: Callable[[], SoftPrompt]) -> SoftPrompt:
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            with suppress(KeyError):  # evicted meanwhile by a delete on another thread
                self._entries.move_to_end(key)
            return entry
        if key in self._loading:
            self.hits += 1
            return await asyncio.shield(self._loading[key])
        self.misses += 1
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        started = time.perf_counter()
        try:
            soft_prompt = await asyncio.to_thread(self._load, load)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._loading[key]
            self.load_seconds += time.perf_counter() - started  # on the event loop: one writer
        self._entries[key] = soft_prompt
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        future.set_result(soft_prompt)
        return soft_prompt

    def evict(self, adapter_id: str) -> None:
        """Forget every version of the adapter; safe from any thread (deletes run in a worker)."""
        for key in list(self._entries):
            if key[0] == adapter_id:
                self._entries.pop(key, None)

    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {
            "size": len(self._entries),
            "capacity": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else None,
            "load_seconds": round(self.load_seconds, 6),
        }
