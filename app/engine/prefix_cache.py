"""Prefix KV shared between the rows of one adapter.

A soft prompt always sits at positions 0..n-1, so its keys and values are the same for every
request of that adapter, and so are those of the prompt text every request starts with (a
template's fixed part). When a row has computed its whole prompt, its slots become the entry for
its adapter; a later row of the same adapter reads the soft prompt plus the longest run of
prompt tokens it has in common with the entry from those slots, at any length (no whole-block
rule, no hashing of embeddings), and computes only the rest.

Entries are keyed by adapter id AND a hash of the soft prompt's content, so a replaced adapter
can never be served from a stale prefix; `drop_adapter` frees an adapter's entries when it is
deleted. Entries hold references on their KV blocks and form an LRU bounded in tokens. Used only
from the engine's thread.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch

from app.engine.kv_cache import BLOCK_SIZE, KVCache


@dataclass(frozen=True)
class PrefixKey:
    adapter_id: str  # "" for the base model
    digest: str  # hash of the soft prompt's values; "" for none


@dataclass(eq=False)
class PrefixEntry:
    num_virtual_tokens: int  # the soft prompt's length
    tokens: tuple[int, ...]  # prompt tokens after the soft prompt
    slots: torch.Tensor  # cache slot of each position, [num_virtual_tokens + len(tokens)]
    blocks: list[int]  # blocks this entry holds a reference on

    @property
    def length(self) -> int:
        return self.num_virtual_tokens + len(self.tokens)


def _common_length(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, kv: KVCache, capacity_tokens: int):
        self.kv = kv
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[PrefixKey, PrefixEntry] = OrderedDict()
        self.num_tokens = 0  # positions the entries hold
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0  # positions rows read from the cache instead of computing

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: PrefixKey) -> bool:
        return key in self._entries

    def match(self, key: PrefixKey, prompt: list[int], num_positions: int) -> tuple[PrefixEntry | None, int]:
        """The entry a row can start from, and how many of its positions the row takes from it:
        never all `num_positions`, since the last position must be computed for its logits."""
        entry = self._entries.get(key)
        if entry is None:
            return None, 0
        return entry, min(entry.num_virtual_tokens + _common_length(entry.tokens, prompt), num_positions - 1)

    def record(self, key: PrefixKey, num_shared: int) -> None:
        """A row was admitted reading `num_shared` positions from `key`'s entry."""
        if num_shared:
            self.hits += 1
            self.reused_tokens += num_shared
            self._entries.move_to_end(key)
        else:
            self.misses += 1

    def offer(self, key: PrefixKey, num_virtual_tokens: int, tokens: list[int], slots: torch.Tensor) -> None:
        """A row has computed these positions. They become the adapter's entry when it has none,
        or when they extend the one it has."""
        length = num_virtual_tokens + len(tokens)
        if not 0 < length <= self.capacity_tokens:
            return
        old = self._entries.get(key)
        if old is not None and (length <= old.length or tuple(tokens[: len(old.tokens)]) != old.tokens):
            return
        self._remove(key)
        while self.num_tokens + length > self.capacity_tokens and self.evict_oldest():
            pass
        blocks = sorted({int(s) // BLOCK_SIZE for s in slots.tolist()})
        self.kv.share(blocks)
        self._entries[key] = PrefixEntry(num_virtual_tokens, tuple(tokens), slots.clone(), blocks)
        self.num_tokens += length

    def reclaimable_blocks(self) -> int:
        """Blocks that evicting every entry would free: those no running row reads."""
        return sum(self.kv.only_holder(entry.blocks) for entry in self._entries.values())

    def evict_oldest(self) -> bool:
        if not self._entries:
            return False
        self._remove(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        """Forget every entry without releasing its blocks: the pool was reset under them."""
        self._entries.clear()
        self.num_tokens = 0

    def drop_adapter(self, adapter_id: str) -> None:
        for key in [k for k in self._entries if k.adapter_id == adapter_id]:
            self._remove(key)

    def _remove(self, key: PrefixKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.kv.release(entry.blocks)  # rows still reading them keep their own references
            self.num_tokens -= entry.length

    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {
            "entries": len(self._entries),
            "tokens": self.num_tokens,
            "capacity_tokens": self.capacity_tokens,
            "bytes": self.num_tokens * self.kv.shape.bytes_per_token,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else None,
            "reused_tokens": self.reused_tokens,
        }
