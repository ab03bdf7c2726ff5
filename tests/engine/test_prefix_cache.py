"""The prefix cache on its own: matching, hits, LRU eviction bounded in tokens, and the block
references its entries hold beside the rows that read them."""

import math

import torch

from app.engine.kv_cache import BLOCK_SIZE, KVCache, KVShape
from app.engine.prefix_cache import PrefixCache, PrefixKey

A, B, C = PrefixKey("a", "1"), PrefixKey("b", "1"), PrefixKey("c", "1")


def pool(blocks: int = 16) -> KVCache:
    return KVCache(KVShape(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32), blocks * BLOCK_SIZE, torch.device("cpu"))


def computed_row(kv: KVCache, positions: int) -> tuple[list[int], torch.Tensor]:
    """A row's own blocks and the slots of its `positions`, as the engine leaves them computed."""
    blocks = math.ceil(positions / BLOCK_SIZE)
    assert kv.reserve(blocks)
    own = [kv.take_reserved() for _ in range(blocks)]
    slots = torch.tensor([own[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(positions)])
    return own, slots


def offer_and_leave(kv: KVCache, cache: PrefixCache, key: PrefixKey, virtual: int, tokens: list[int]) -> list[int]:
    """A row computes its prompt, offers it and finishes: only the entry holds its blocks now."""
    own, slots = computed_row(kv, virtual + len(tokens))
    cache.offer(key, virtual, tokens, slots)
    kv.release(own)
    return own


def used_blocks(kv: KVCache) -> int:
    return kv.stats()["used_tokens"] // BLOCK_SIZE


def test_a_row_reads_the_soft_prompt_and_the_prompt_tokens_in_common_never_its_last_position():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=1024)
    offer_and_leave(kv, cache, A, 4, [5, 6, 7, 8])
    entry, shared = cache.match(A, [5, 6, 9], num_positions=4 + 3)
    assert entry is not None and shared == 4 + 2
    assert cache.match(A, [5, 6, 7, 8], num_positions=8)[1] == 7  # the last one is computed for its logits
    assert cache.match(B, [5, 6, 7, 8], num_positions=8) == (None, 0)
    assert cache.match(PrefixKey("a", "2"), [5, 6], num_positions=6) == (None, 0)  # a replaced adapter


def test_hits_and_misses_are_recorded_by_the_admitted_row():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=1024)
    offer_and_leave(kv, cache, A, 2, [1, 2, 3])
    cache.record(A, 4)
    cache.record(B, 0)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["reused_tokens"], stats["hit_rate"]) == (1, 1, 4, 0.5)


def test_the_entry_holds_its_blocks_after_the_row_that_computed_it_left():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=1024)
    own = offer_and_leave(kv, cache, A, 0, list(range(20)))
    assert used_blocks(kv) == len(own) == 2 and len(cache) == 1 and cache.num_tokens == 20
    assert cache.reclaimable_blocks() == 2
    assert cache.evict_oldest() and not cache.evict_oldest()
    assert used_blocks(kv) == 0 and cache.num_tokens == 0


def test_eviction_takes_the_least_recently_used_entry_first():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=3 * BLOCK_SIZE)
    for key in (A, B, C):
        offer_and_leave(kv, cache, key, 0, list(range(BLOCK_SIZE)))
    cache.record(A, 5)  # A was read: now the most recent
    assert cache.evict_oldest()
    assert A in cache and B not in cache and C in cache
    assert cache.evict_oldest()
    assert A in cache and C not in cache


def test_a_new_entry_evicts_the_oldest_past_the_token_bound():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=2 * BLOCK_SIZE)
    offer_and_leave(kv, cache, A, 0, list(range(BLOCK_SIZE)))
    offer_and_leave(kv, cache, B, 0, list(range(BLOCK_SIZE)))
    offer_and_leave(kv, cache, C, 0, list(range(BLOCK_SIZE)))
    assert A not in cache and B in cache and C in cache
    assert cache.num_tokens == 2 * BLOCK_SIZE and used_blocks(kv) == 2
    offer_and_leave(kv, cache, A, 0, list(range(3 * BLOCK_SIZE)))  # larger than the whole cache: not kept
    assert A not in cache and len(cache) == 2


def test_blocks_a_running_row_reads_are_not_freed_by_eviction():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=1024)
    offer_and_leave(kv, cache, A, 0, list(range(2 * BLOCK_SIZE)))
    offer_and_leave(kv, cache, B, 0, list(range(BLOCK_SIZE)))
    entry, _ = cache.match(A, list(range(2 * BLOCK_SIZE)), 2 * BLOCK_SIZE + 1)
    kv.share(entry.blocks)  # a row admitted reading A's entry
    assert cache.reclaimable_blocks() == 1  # B's only
    cache.evict_oldest()
    cache.evict_oldest()
    assert len(cache) == 0 and used_blocks(kv) == 2  # the row still holds A's blocks
    kv.release(entry.blocks)
    assert used_blocks(kv) == 0


def test_an_entry_is_replaced_only_by_one_that_extends_it():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=1024)
    offer_and_leave(kv, cache, A, 2, [1, 2, 3])
    offer_and_leave(kv, cache, A, 2, [1, 2])  # shorter
    offer_and_leave(kv, cache, A, 2, [1, 9, 3, 4])  # longer, but diverging
    assert cache.match(A, [1, 2, 3, 4], 10)[0].tokens == (1, 2, 3)
    assert used_blocks(kv) == 1  # the refused offers kept nothing
    offer_and_leave(kv, cache, A, 2, [1, 2, 3, 4])
    assert cache.match(A, [1, 2, 3, 4], 10)[0].tokens == (1, 2, 3, 4)
    assert len(cache) == 1 and cache.num_tokens == 6 and used_blocks(kv) == 1


def test_dropping_an_adapter_frees_every_entry_of_it_and_no_other():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=1024)
    offer_and_leave(kv, cache, A, 1, [1])
    offer_and_leave(kv, cache, PrefixKey("a", "2"), 1, [1])
    offer_and_leave(kv, cache, B, 1, [1])
    cache.drop_adapter("a")
    assert len(cache) == 1 and B in cache and used_blocks(kv) == 1


def test_clear_forgets_entries_without_releasing_what_the_reset_pool_no_longer_tracks():
    kv = pool()
    cache = PrefixCache(kv, capacity_tokens=1024)
    offer_and_leave(kv, cache, A, 0, [1, 2])
    kv.reset()
    cache.clear()
    assert len(cache) == 0 and cache.num_tokens == 0 and used_blocks(kv) == 0
    assert kv.num_available_blocks == kv.capacity_blocks
