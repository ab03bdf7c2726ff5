"""LRU cache of soft-prompt tensors on the model's device, keyed by adapter id.

Concurrent first uses of a cold adapter share one load (single flight); loading runs in a
thread so the event loop keeps serving.
"""

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import torch


class AdapterCache:
    def __init__(self, capacity: int, device: torch.device, dtype: torch.dtype):
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    async def get(self, key: str, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        if key in self._loading:
            self.hits += 1
            return await asyncio.shield(self._loading[key])
        self.misses += 1
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            tensor = await asyncio.to_thread(lambda: load().to(self.device, self.dtype))
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._loading[key]
        self._entries[key] = tensor
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        future.set_result(tensor)
        return tensor

    def evict(self, key: str) -> None:
        self._entries.pop(key, None)

    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {
            "size": len(self._entries),
            "capacity": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else None,
        }
