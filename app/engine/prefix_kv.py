"""Prefix tuning's per-layer keys and values, in PEFT's layout and the model's.

PEFT stores a PREFIX_TUNING adapter as one tensor [n, layers * 2 * kv_heads * head_dim]: for each
virtual token, layer l's key then its value (PeftModel.get_prompt views it as
[n, layers * 2, kv_heads, head_dim]). The engine holds it as [layers, 2, n, kv_heads, head_dim],
the cache's own [slots, kv_heads, head_dim] per layer; the model's own forward (reference decode,
training) takes it as a transformers cache holding positions 0..n-1 (PrefixPast).
"""

import torch
from transformers import DynamicCache

from app.engine.kv_cache import KVShape


def flat_width(shape: KVShape) -> int:
    return shape.layers * 2 * shape.kv_heads * shape.head_dim


def from_flat(flat: torch.Tensor, shape: KVShape) -> torch.Tensor:
    """[n, layers * 2 * kv_heads * head_dim] (PEFT) -> [layers, 2, n, kv_heads, head_dim]."""
    n = flat.shape[0]
    return flat.reshape(n, shape.layers, 2, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 3, 4)


def to_flat(kv: torch.Tensor) -> torch.Tensor:
    """The inverse of from_flat."""
    layers, _, n, kv_heads, head_dim = kv.shape
    return kv.permute(2, 0, 1, 3, 4).reshape(n, layers * 2 * kv_heads * head_dim)


class PrefixPast(DynamicCache):
    """A transformers cache holding a prefix at positions 0..n-1 for the model's own forward
    (reference decode, training), `rows` times over. A forward attends to the prefix and its own
    keys, as after PEFT's cache, but stores nothing: recomputing a checkpointed layer in backward
    sees the same past, and gradients reach the prefix through the concatenation."""

    def __init__(self, kv: torch.Tensor, config, rows: int = 1):
        super().__init__(config=config.get_text_config())
        for layer, (keys, values) in enumerate(kv):  # [n, kv_heads, head_dim] -> [rows, kv_heads, n, head_dim]
            super().update(keys.transpose(0, 1).expand(rows, -1, -1, -1),
                           values.transpose(0, 1).expand(rows, -1, -1, -1), layer)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
