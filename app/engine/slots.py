"""Where each running row's positions live in the KV pool: the engine's block manager.

`slot_table[r, p]` is the cache slot of position p of the row running in slot table row r. The
table is on the host (a step's indices are worked out there, then sent in one copy:
app.engine.transfers), as wide as the longest row's keys padded to a whole KEY_BUCKET.

Invariants: a row is admitted only once every block it can ever need is reserved (`reserve`),
reading what it can from a prefix entry, so it never runs out of memory half-way; it takes its
reserved blocks one by one as its positions are first written (`slots_for`); `release` gives back
everything it holds. Cached prefixes are evicted, oldest first, only when that frees enough for
the row (blocks running rows read are not freed). Used only from the engine's thread.
"""

import math

import torch

from app.engine.kv_cache import BLOCK_SIZE, KVCache
from app.engine.prefix_cache import PrefixCache
from app.engine.rows import Row

KEY_BUCKET = 64  # attention pads each row's keys to a multiple of this (see ModelRunner.prepare_step)


class SlotManager:
    def __init__(self, kv: KVCache, prefix: PrefixCache, max_rows: int, max_row_positions: int):
        self.kv = kv
        self.prefix = prefix
        self.max_rows = max_rows
        self.slot_table = torch.zeros(max_rows, -(-max_row_positions // KEY_BUCKET) * KEY_BUCKET, dtype=torch.long)
        self._free_table_rows = list(range(max_rows - 1, -1, -1))

    def has_free_table_row(self) -> bool:
        return bool(self._free_table_rows)

    def take_table_row(self) -> int:
        return self._free_table_rows.pop()

    def free_table_row(self, index: int) -> None:
        self._free_table_rows.append(index)

    def reserve(self, row: Row, num_positions: int) -> torch.Tensor | None:
        """Reserve the blocks of the row's worst-case `num_positions`, reading what it can from a
        prefix entry, and return the slots it reads; None while the pool is short."""
        while True:
            entry, num_shared = self.prefix.match(row.prefix_key, row.tokens, row.num_positions)
            num_blocks = math.ceil((num_positions - num_shared) / BLOCK_SIZE)
            if num_blocks > self.kv.num_available_blocks + self.prefix.reclaimable_blocks():
                return None
            if entry is not None:
                self.kv.share(entry.blocks)  # held before any eviction could free them
            if self.kv.reserve(num_blocks):
                break
            if entry is not None:
                self.kv.release(entry.blocks)
            if not self.prefix.evict_oldest():
                return None
        self.prefix.record(row.prefix_key, num_shared)
        row.num_reserved_blocks = num_blocks
        if entry is None:
            return self.slot_table.new_empty(0)
        row.borrowed_blocks, row.num_shared_positions, row.num_computed_positions = entry.blocks, num_shared, num_shared
        return entry.slots[:num_shared]

    def map_shared(self, row: Row, prefix_slots: torch.Tensor) -> None:
        """Point the row's shared positions at the prefix entry's slots."""
        self.slot_table[row.slot_table_row, : row.num_shared_positions] = prefix_slots

    def map_virtual(self, row: Row) -> None:
        """Give a prefix-tuned row's soft prompt positions slots of its own (its keys and values
        are written there, not computed)."""
        virtual = self.slots_for(row, 0, row.num_virtual_tokens)
        self.slot_table[row.slot_table_row, : row.num_virtual_tokens] = torch.tensor(virtual)

    def slots_for(self, row: Row, start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 (own positions), taking reserved blocks as needed."""
        last_block = (end - 1 - row.num_shared_positions) // BLOCK_SIZE
        while len(row.own_blocks) <= last_block:
            row.own_blocks.append(self.kv.take_reserved())
            row.num_reserved_blocks -= 1
        blocks, shared = row.own_blocks, row.num_shared_positions
        return [blocks[q // BLOCK_SIZE] * BLOCK_SIZE + q % BLOCK_SIZE for q in range(start - shared, end - shared)]

    def release(self, row: Row) -> None:
        """Give back the row's blocks and what is left of its reservation."""
        self.kv.release(row.own_blocks)
        self.kv.release(row.borrowed_blocks)
        self.kv.release_reservation(row.num_reserved_blocks)
        row.forget_blocks()

    def reset(self) -> None:
        """Forget every row and every cached prefix: the KV pool's bookkeeping from scratch (its
        tensors are kept: every slot is written before it is read)."""
        self.kv.reset()
        self.prefix.clear()
        self.slot_table.zero_()
        self._free_table_rows = list(range(self.max_rows - 1, -1, -1))
