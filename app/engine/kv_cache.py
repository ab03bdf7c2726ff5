"""The engine's KV memory: one preallocated pool of token slots, handed out in blocks.

Keys and values of every layer live in `[layers, slots, kv_heads, head_dim]` tensors allocated
once, sized by KV_CACHE_TOKENS. Slots are handed out in blocks of BLOCK_SIZE; a block is
reference-counted, so a prefix computed once (an adapter's soft prompt and the text after it)
is read by every row that starts with it. A row reserves the blocks it can ever need when it is
admitted, so it can never run out of memory half-way: requests wait while the pool is full.
Block 0 is never handed out: padding in gathers points at it.
"""

from dataclasses import dataclass

import torch

BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> "KVShape":
        config = config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


class KVCache:
    def __init__(self, shape: KVShape, tokens: int, device: torch.device):
        self.shape = shape
        self.num_blocks = max(tokens // BLOCK_SIZE, 1) + 1  # + the padding block
        size = (shape.layers, self.num_blocks * BLOCK_SIZE, shape.kv_heads, shape.head_dim)
        self.keys = torch.zeros(size, dtype=shape.dtype, device=device)
        self.values = torch.zeros(size, dtype=shape.dtype, device=device)
        self.reset()

    def reset(self) -> None:
        """Every block free and unpromised (the tensors keep their contents: a slot is always
        written before it is read)."""
        self._free = list(range(self.num_blocks - 1, 0, -1))  # pop() hands out low blocks first
        self._refs = [0] * self.num_blocks
        self.num_reserved_blocks = 0  # promised to admitted rows, not yet handed out

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_available_blocks(self) -> int:
        """Blocks that can still be promised."""
        return len(self._free) - self.num_reserved_blocks

    def reserve(self, blocks: int) -> bool:
        if blocks > self.num_available_blocks:
            return False
        self.num_reserved_blocks += blocks
        return True

    def release_reservation(self, blocks: int) -> None:
        self.num_reserved_blocks -= blocks

    def take_reserved(self) -> int:
        """Hand out one block of a reservation."""
        self.num_reserved_blocks -= 1
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, blocks) -> None:
        for block in blocks:
            self._refs[block] += 1

    def release(self, blocks) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def only_holder(self, blocks) -> int:
        """How many of `blocks` have a single holder (the caller's release would free them)."""
        return sum(self._refs[block] == 1 for block in blocks)

    def stats(self) -> dict:
        used = self.capacity_blocks - len(self._free)
        return {
            "capacity_tokens": self.capacity_blocks * BLOCK_SIZE,
            "used_tokens": used * BLOCK_SIZE,
            "reserved_tokens": self.num_reserved_blocks * BLOCK_SIZE,
            "usage": (used + self.num_reserved_blocks) / self.capacity_blocks,
            "block_size": BLOCK_SIZE,
            "bytes_per_token": self.shape.bytes_per_token,
            "capacity_bytes": self.capacity_blocks * BLOCK_SIZE * self.shape.bytes_per_token,
        }
