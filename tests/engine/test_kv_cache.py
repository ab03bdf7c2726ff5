"""The KV pool's block bookkeeping on its own: reservations, reference counts, the free list."""

import pytest
import torch

from app.engine.kv_cache import BLOCK_SIZE, KVCache, KVShape


def pool(blocks: int = 4) -> KVCache:
    return KVCache(KVShape(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32), blocks * BLOCK_SIZE, torch.device("cpu"))


def used_blocks(kv: KVCache) -> int:
    return kv.stats()["used_tokens"] // BLOCK_SIZE


def test_a_pool_holds_its_blocks_and_a_padding_block_that_is_never_handed_out():
    kv = pool(4)
    assert kv.capacity_blocks == 4 and kv.num_available_blocks == 4
    assert kv.keys.shape == (1, 5 * BLOCK_SIZE, 1, 2)
    assert kv.reserve(4)
    taken = [kv.take_reserved() for _ in range(4)]
    assert taken == [1, 2, 3, 4]  # low blocks first, block 0 never
    assert kv.num_available_blocks == 0 and not kv.reserve(1)


def test_a_reservation_promises_blocks_without_taking_them():
    kv = pool(4)
    assert kv.reserve(3)
    assert (kv.num_reserved_blocks, kv.num_available_blocks, used_blocks(kv)) == (3, 1, 0)
    assert not kv.reserve(2)  # more than is left: nothing changes
    assert (kv.num_reserved_blocks, kv.num_available_blocks) == (3, 1)
    block = kv.take_reserved()
    assert (kv.num_reserved_blocks, kv.num_available_blocks, used_blocks(kv)) == (2, 1, 1)
    assert kv.only_holder([block]) == 1
    kv.release_reservation(2)
    assert (kv.num_reserved_blocks, kv.num_available_blocks) == (0, 3)
    assert kv.stats()["reserved_tokens"] == 0


def test_a_block_is_freed_when_its_last_holder_releases_it():
    kv = pool(4)
    kv.reserve(2)
    first, second = kv.take_reserved(), kv.take_reserved()
    kv.share([first])  # a second holder (a prefix entry, or a row reading one)
    assert kv.only_holder([first, second]) == 1
    kv.release([first])
    assert used_blocks(kv) == 2 and kv.num_available_blocks == 2  # still held once
    assert kv.only_holder([first, second]) == 2
    kv.release([first, second])
    assert used_blocks(kv) == 0 and kv.num_available_blocks == 4


def test_a_freed_block_is_handed_out_again():
    kv = pool(2)
    kv.reserve(2)
    first, second = kv.take_reserved(), kv.take_reserved()
    kv.release([first])
    kv.reserve(1)
    assert kv.take_reserved() == first
    assert kv.num_available_blocks == 0 and second != first


def test_usage_counts_blocks_in_use_and_promised():
    kv = pool(4)
    kv.reserve(2)
    kv.take_reserved()
    stats = kv.stats()
    assert (stats["used_tokens"], stats["reserved_tokens"]) == (BLOCK_SIZE, BLOCK_SIZE)
    assert stats["usage"] == pytest.approx(2 / 4)
    assert stats["capacity_tokens"] == 4 * BLOCK_SIZE and stats["capacity_bytes"] == 4 * BLOCK_SIZE * 2 * 2 * 4


def test_reset_frees_every_block_and_promise_and_keeps_the_tensors():
    kv = pool(3)
    kv.reserve(3)
    block = kv.take_reserved()
    kv.share([block])
    keys = kv.keys
    kv.keys[:, block * BLOCK_SIZE] = 1.0
    kv.reset()
    assert (kv.num_available_blocks, kv.num_reserved_blocks, used_blocks(kv)) == (3, 0, 0)
    assert kv.keys is keys and float(kv.keys[0, block * BLOCK_SIZE, 0, 0]) == 1.0
    kv.reserve(3)
    assert [kv.take_reserved() for _ in range(3)] == [1, 2, 3]
