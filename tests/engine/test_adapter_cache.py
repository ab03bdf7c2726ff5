import asyncio

import pytest
import torch

from app.engine.adapter_cache import AdapterCache


def make_cache(capacity=2):
    return AdapterCache(capacity, torch.device("cpu"), torch.float32)


async def test_lru_evicts_least_recently_used():
    cache = make_cache(capacity=2)
    for key in ("a", "b"):
        await cache.get(key, lambda: torch.zeros(2, 4))
    await cache.get("a", lambda: pytest.fail("a is cached"))  # touch a: b is now oldest
    await cache.get("c", lambda: torch.ones(2, 4))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.stats() == {"size": 2, "capacity": 2, "hits": 1, "misses": 3, "hit_rate": 0.25}


async def test_concurrent_first_uses_load_once():
    cache = make_cache()
    calls = 0

    def slow_load():
        nonlocal calls
        calls += 1
        import time

        time.sleep(0.2)
        return torch.full((2, 4), 7.0, dtype=torch.float16)

    tensors = await asyncio.gather(*(cache.get("x", slow_load) for _ in range(5)))
    assert calls == 1
    assert all(t.dtype == torch.float32 and t[0, 0] == 7.0 for t in tensors)


async def test_failed_load_is_not_cached_and_reaches_every_waiter():
    cache = make_cache()

    def broken():
        import time

        time.sleep(0.1)
        raise FileNotFoundError("gone")

    results = await asyncio.gather(*(cache.get("x", broken) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, FileNotFoundError) for r in results)
    assert "x" not in cache
    assert (await cache.get("x", lambda: torch.zeros(1, 4))).shape == (1, 4)


async def test_evict_forgets_the_entry():
    cache = make_cache()
    await cache.get("x", lambda: torch.zeros(1, 4))
    cache.evict("x")
    assert "x" not in cache and len(cache) == 0
