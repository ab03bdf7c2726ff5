"""Attention over the engine's paged KV cache, plugged into transformers' attention interface.

An engine step feeds the model ONE flat sequence `[1, T]` holding the new tokens of every row
(one token for a decoding row, a chunk for a prefilling one), with each token's own position.
For every layer this function writes the new keys/values into their cache slots, then lets each
row's queries attend to that row's slots only: rows are gathered by a per-row slot table, so rows
of any length, adapter and prefix (shared slots) mix in one forward pass. On the CPU, decoding rows
(one query each) read their slots in place through the engine's float kernel
(app.engine.float_kernel.decode_attention) instead of gathering them for torch's.

Outside an engine step (training, the reference decode, PEFT) the model's own attention runs
unchanged: the step is passed through a context variable, which other threads never see.
"""

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from app.engine import float_kernel

PREFIX = "softserve_paged+"
_current: ContextVar["StepAttention | None"] = ContextVar("softserve_step", default=None)


@dataclass
class RowGroup:
    """Rows that attend together: `queries` new tokens each, keys padded to `keys` positions."""

    tokens: torch.Tensor  # [rows * queries] index of each (row, query) in the flat sequence
    slots: torch.Tensor  # [rows * keys] cache slot of each (row, key position); padding points at slot 0
    query_positions: torch.Tensor  # [rows, queries]
    key_lengths: torch.Tensor  # [rows] positions each row attends to (its past plus its new tokens)
    rows: int
    queries: int
    keys: int
    _bias: dict = field(default_factory=dict)  # sliding window -> additive mask, made once per step

    def bias(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[rows, queries, keys]: 0 where a query sees a key (causal, in its row, inside the
        window), -inf elsewhere."""
        if window not in self._bias:
            keys = torch.arange(self.keys, device=self.slots.device)
            positions = self.query_positions[:, :, None]
            visible = (keys <= positions) & (keys < self.key_lengths[:, None, None])
            if window is not None:  # transformers' sliding window: key > query - window
                visible &= keys > positions - window
            bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
            self._bias[window] = bias.masked_fill_(~visible, float("-inf"))
        return self._bias[window]


@dataclass
class StepAttention:
    """What every layer needs for one engine step: where new keys go and who attends to what."""

    keys: torch.Tensor  # [layers, slots, kv_heads, head_dim]
    values: torch.Tensor
    write_slots: torch.Tensor  # [T] cache slot of each new token
    groups: list[RowGroup]  # decoding rows together, prefilling rows together
    # The most bytes one layer's attention may gather and score at once (keys, values, scores):
    # a group of more rows attends in slices of rows, each alone as it would in the whole group.
    max_temporary_bytes: int = 256 << 20

    def rows_at_once(self, group: RowGroup, heads: int) -> int:
        kv_heads, dim = self.keys.shape[2], self.keys.shape[3]
        per_row = group.keys * (2 * kv_heads * dim * self.keys.element_size() + heads * group.queries * 4)
        return max(1, min(group.rows, self.max_temporary_bytes // per_row))


@contextmanager
def engine_step(step: StepAttention):
    token = _current.set(step)
    try:
        yield
    finally:
        _current.reset(token)


def _attend(query, keys, values, bias, scaling: float, softcap: float | None) -> torch.Tensor:
    """query [R, H, Q, D], keys/values [R, L, KVH, D], bias [R, Q, L] -> [R, H, Q, D]. Query heads
    are grouped under their key/value head, so keys are never repeated per head."""
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [R, KVH, L, D], views
    if softcap is None:  # torch's fused kernel; it has no logit softcapping (Gemma 2)
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=bias[:, None].to(query.dtype), scale=scaling,
            enable_gqa=query.shape[1] != keys.shape[1],
        )
    rows, heads, queries, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    q = query.reshape(rows, kv_heads, group * queries, dim)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scaling  # [R, KVH, G*Q, L]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(rows, kv_heads, group, queries, -1) + bias[:, None, None]
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype).view(rows, kv_heads, group * queries, -1)
    return torch.matmul(probs, values).view(rows, heads, queries, dim)


def _paged_attention(step: StepAttention, module, query, key, value, scaling, sliding_window, softcap):
    layer = module.layer_idx
    cache_k, cache_v = step.keys[layer], step.values[layer]
    # query [1, H, T, D]; key/value [1, KVH, T, D] -> the cache's [T, KVH, D] layout
    cache_k.index_copy_(0, step.write_slots, key[0].transpose(0, 1).to(cache_k.dtype))
    cache_v.index_copy_(0, step.write_slots, value[0].transpose(0, 1).to(cache_v.dtype))
    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    flat_query = query[0].transpose(0, 1)  # [T, H, D]
    out = flat_query.new_empty(total, heads, dim)
    in_place = softcap is None and float_kernel.attends(flat_query, cache_k)  # for decoding rows
    for group in step.groups:
        bias = group.bias(sliding_window, torch.float32)
        if group.queries == 1 and in_place:
            float_kernel.decode_attention(flat_query, group.tokens, cache_k, cache_v,
                                          group.slots.view(group.rows, group.keys), bias[:, 0], scaling, out)
            continue
        at_once = step.rows_at_once(group, heads)
        for first in range(0, group.rows, at_once):  # rows attend alone: slicing them changes no result
            rows = min(at_once, group.rows - first)
            tokens = group.tokens[first * group.queries : (first + rows) * group.queries]
            slots = group.slots[first * group.keys : (first + rows) * group.keys]
            q = flat_query.index_select(0, tokens).view(rows, group.queries, heads, dim).transpose(1, 2)
            k = cache_k.index_select(0, slots).view(rows, group.keys, *cache_k.shape[1:])
            v = cache_v.index_select(0, slots).view(rows, group.keys, *cache_v.shape[1:])
            attended = _attend(q, k, v, bias[first : first + rows], scaling, softcap)
            out.index_copy_(0, tokens, attended.transpose(1, 2).reshape(rows * group.queries, heads, dim).to(out.dtype))
    return out.unsqueeze(0), None  # [1, T, H, D], as transformers' attention functions return


def install(model) -> None:
    """Route the model's attention through the engine during engine steps; elsewhere it keeps its
    own implementation (and mask). Idempotent."""
    original = model.config._attn_implementation
    if original.startswith(PREFIX):
        return
    name = PREFIX + original

    def attention(module, query, key, value, attention_mask, **kwargs):
        step = _current.get()
        if step is None:
            if original in ALL_ATTENTION_FUNCTIONS:
                fallback = ALL_ATTENTION_FUNCTIONS[original]
            else:  # "eager" is each modeling file's own function
                fallback = sys.modules[type(module).__module__].eager_attention_forward
            return fallback(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return _paged_attention(step, module, query, key, value, scaling, kwargs.get("sliding_window"),
                                kwargs.get("softcap"))

    def mask(*args, **kwargs):
        return None if _current.get() is not None else fallback_mask(*args, **kwargs)

    AttentionInterface.register(name, attention)
    if original in ALL_MASK_ATTENTION_FUNCTIONS:  # else the model makes no mask: neither do we
        fallback_mask = ALL_MASK_ATTENTION_FUNCTIONS[original]
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    model.set_attn_implementation(name)
