"""docs/engine.md, property 6 at the level of one layer's attention: a row's attention output is
the same, bit for bit, computed alone or in a step with any other rows, whatever their lengths and
however many threads the engine computes with. The token-level isolation tests would only catch a
difference that flips a greedy token; this catches any."""

import random
from types import SimpleNamespace

import pytest
import torch

from app.engine import attention
from app.engine.model_runner import _groups
from app.engine.slots import KEY_BUCKET
from app.engine.transfers import StepInputs

SLOTS = 8192


def _step(rows: list[tuple[int, int]], keys, values, layout: dict[int, list[int]], pad_decoding_rows: bool):
    """An engine step over `rows` (key length, new tokens) grouped as the runner groups them, with
    the step's flat queries; `layout[i]` is row i's slots."""
    width = -(-max(length for length, _ in rows) // KEY_BUCKET) * KEY_BUCKET
    slot_table = torch.zeros(len(rows), width, dtype=torch.long)
    work, offset = [], 0
    for i, (length, new) in enumerate(rows):
        slot_table[i, :length] = torch.tensor(layout[i][:length])
        work.append(SimpleNamespace(row=SimpleNamespace(slot_table_row=i), start=length - new, num_positions=new,
                                    offset=offset, end=length))
        offset += new
    inputs = StepInputs()
    groups = _groups(work, slot_table, inputs, pad_decoding_rows)
    write = inputs.ints([layout[i][p] for i, (length, new) in enumerate(rows) for p in range(length - new, length)])
    inputs.send(torch.device("cpu"))
    return attention.StepAttention(keys, values, write.tensor, [group() for group in groups]), offset


def _attend(rows, layout, queries, new_keys, new_values, keys, values, softcap, threads):
    step, total = _step(rows, keys.clone(), values.clone(), layout, pad_decoding_rows=softcap is None)
    module = SimpleNamespace(layer_idx=0)
    torch.set_num_threads(threads)
    out, _ = attention._paged_attention(step, module, queries[:, :, :total], new_keys[:, :, :total],
                                        new_values[:, :, :total], 0.125, None, softcap)
    return out[0], step


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 1, 256), (8, 2, 64)])
def test_a_rows_attention_is_the_same_bits_alone_and_beside_rows_of_any_length(heads, kv_heads, dim, softcap):
    threads = torch.get_num_threads()
    generator = random.Random(0)
    torch.manual_seed(0)
    keys, values = torch.randn(1, SLOTS, kv_heads, dim), torch.randn(1, SLOTS, kv_heads, dim)
    try:
        for _ in range(4):
            # decoding rows (one new token) of spread-out lengths, and prefilling chunks
            rows = [(generator.randint(1, 1500), 1) for _ in range(generator.randint(2, 9))]
            rows += [(generator.randint(40, 600), generator.choice([7, 32])) for _ in range(generator.randint(0, 2))]
            slots = generator.sample(range(1, SLOTS), sum(length for length, _ in rows))
            layout, start = {}, 0
            for i, (length, _) in enumerate(rows):
                layout[i], start = slots[start : start + length], start + length
            total = sum(new for _, new in rows)
            queries = torch.randn(1, heads, total, dim)
            new_keys, new_values = torch.randn(1, kv_heads, total, dim), torch.randn(1, kv_heads, total, dim)
            together, step = _attend(rows, layout, queries, new_keys, new_values, keys, values, softcap, threads=2)
            if softcap is None:  # every decoding row in one call (capped logits: one per bucket, see _groups)
                assert sum(1 for group in step.groups if group.queries == 1) == 1
            offset = 0
            for i, (length, new) in enumerate(rows):
                alone, _ = _attend([(length, new)], {0: layout[i]}, queries[:, :, offset : offset + new],
                                   new_keys[:, :, offset : offset + new], new_values[:, :, offset : offset + new],
                                   keys, values, softcap, threads=2)
                assert torch.equal(alone, together[offset : offset + new]), f"row {i} of {rows}"
                offset += new
    finally:
        torch.set_num_threads(threads)


def test_the_engine_keeps_its_thread_count_after_attending():
    """Attention computes on one thread and gives the caller its threads back."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with attention._one_thread_on_cpu(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
