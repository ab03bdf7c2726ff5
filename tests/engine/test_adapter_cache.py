import asyncio

import pytest
import torch

from app.engine.adapter_cache import AdapterCache
from app.engine.requests import SoftPrompt


def make_cache(capacity=2):
    return AdapterCache(capacity, torch.device("cpu"), torch.float32)


async def test_lru_evicts_least_recently_used():
    cache = make_cache(capacity=2)
    for key in ("a", "b"):
        await cache.get((key, "sha"), lambda: SoftPrompt(torch.zeros(2, 4), "x"))
    await cache.get(("a", "sha"), lambda: pytest.fail("a is cached"))  # touch a: b is now oldest
    await cache.get(("c", "sha"), lambda: SoftPrompt(torch.ones(2, 4), "x"))
    assert ("b", "sha") not in cache and ("a", "sha") in cache and ("c", "sha") in cache
    stats = cache.stats()
    assert stats.pop("load_seconds") > 0
    assert stats == {"size": 2, "capacity": 2, "hits": 1, "misses": 3, "hit_rate": 0.25}


async def test_concurrent_first_uses_load_once():
    cache = make_cache()
    calls = 0

    def slow_load():
        nonlocal calls
        calls += 1
        import time

        time.sleep(0.2)
        return SoftPrompt(torch.full((2, 4), 7.0, dtype=torch.float16), "x")

    prompts = await asyncio.gather(*(cache.get(("x", "sha"), slow_load) for _ in range(5)))
    assert calls == 1
    assert all(p.embeddings.dtype == torch.float32 and p.embeddings[0, 0] == 7.0 for p in prompts)
    assert {p.adapter_id for p in prompts} == {"x"}


async def test_failed_load_is_not_cached_and_reaches_every_waiter():
    cache = make_cache()

    def broken():
        import time

        time.sleep(0.1)
        raise FileNotFoundError("gone")

    results = await asyncio.gather(*(cache.get(("x", "sha"), broken) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, FileNotFoundError) for r in results)
    assert ("x", "sha") not in cache
    assert (await cache.get(("x", "sha"), lambda: SoftPrompt(torch.zeros(1, 4), "x"))).embeddings.shape == (1, 4)


async def test_evict_forgets_every_version_of_the_adapter():
    cache = make_cache(capacity=4)
    await cache.get(("x", "old"), lambda: SoftPrompt(torch.zeros(1, 4), "x"))
    await cache.get(("x", "new"), lambda: SoftPrompt(torch.ones(1, 4), "x"))
    await cache.get(("y", "sha"), lambda: SoftPrompt(torch.ones(1, 4), "x"))
    cache.evict("x")
    assert len(cache) == 1 and ("y", "sha") in cache


async def test_same_id_with_other_content_is_loaded_afresh_with_its_own_digest():
    cache = make_cache()
    old = await cache.get(("x", "sha-1"), lambda: SoftPrompt(torch.zeros(1, 4), "x"))
    new = await cache.get(("x", "sha-2"), lambda: SoftPrompt(torch.ones(1, 4), "x"))
    assert new.embeddings[0, 0] == 1.0 and old.digest != new.digest
