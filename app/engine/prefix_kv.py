"""Prefix tuning's per-layer keys and values, in PEFT's layout and the model's.

PEFT stores a PREFIX_TUNING adapter as one tensor [n, layers * 2 * kv_heads * head_dim]: for each
virtual token, layer l's key then its value (PeftModel.get_prompt views it as
[n, layers * 2, kv_heads, head_dim]). The engine holds it as [layers, 2, n, kv_heads, head_dim],
the cache's own [slots, kv_heads, head_dim] per layer; the model's own forward (reference decode,
training) takes it as a transformers cache holding positions 0..n-1.
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


def model_cache(kv: torch.Tensor, config) -> DynamicCache:
    """A fresh transformers cache holding the prefix at positions 0..n-1, as PEFT builds it: the
    model appends each forward's keys and values to it (keeping gradients, for training)."""
    cache = DynamicCache(config=config.get_text_config())
    for layer, (keys, values) in enumerate(kv):  # [n, kv_heads, head_dim] -> [1, kv_heads, n, head_dim]
        cache.update(keys.transpose(0, 1)[None], values.transpose(0, 1)[None], layer)
    return cache
