"""The model runner: the resident model as the engine drives it, one forward pass per step.

Every step is ONE flat sequence `[1, T]` of new tokens from any number of rows; `attention.py`
keeps each row's queries to its own cached keys. A step goes in three calls: `prepare_step`
turns the scheduled chunks into the step's inputs on the host (token ids, positions, cache
slots, attention groups, sampling parameters), `send` copies them to the device in one copy and
writes admitted prefix-tuned rows' keys and values into the cache, and `run_step` runs the pass.
The model's own code runs unchanged (embeddings, positions, norms, LM head and final logit
processing), so any transformers causal LM that uses the attention interface is served the same
way.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.engine import attention
from app.engine.attention import RowGroup, StepAttention
from app.engine.kv_cache import KVCache
from app.engine.loader import BaseModel
from app.engine.rows import Row, ScheduledChunk
from app.engine.sampling import SamplingParams
from app.engine.slots import KEY_BUCKET, SlotManager
from app.engine.transfers import Sent, StepInputs


@dataclass
class PreparedStep:
    """A step's inputs, gathered on the host; their device tensors once sent."""

    inputs: StepInputs
    ids: Sent
    positions: Sent
    slots: Sent
    virtual_at: Sent  # flat index of each soft-prompt position
    virtual_embeddings: list[torch.Tensor]  # their embeddings, row by row
    logits_at: Sent  # flat index of each sampled row's last position
    sampled_rows: list[Row]
    prefix_writes: list[tuple[Row, Sent]]  # prefix-tuned rows and the slots of their soft prompt
    groups: list[Callable[[], RowGroup]]
    sampling_params: Callable[[], SamplingParams]


class ModelRunner:
    def __init__(self, base: BaseModel):
        attention.install(base.model)
        self.base = base
        self.device = base.device
        self._embed = base.model.get_input_embeddings()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, hidden]: the space soft prompts live in (Gemma's scaling included)."""
        return self._embed(token_ids)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, step: attention.StepAttention, logits_at: torch.Tensor
    ) -> torch.Tensor:
        """Run the model over the step's tokens; return float32 logits [len(logits_at), vocab]
        at the flat positions `logits_at` only (the LM head is the largest matmul per token)."""
        with attention.engine_step(step):
            out = self.base.model(
                inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False, logits_to_keep=logits_at
            )
        return out.logits[0].float()

    # -- one engine step ------------------------------------------------------------------------

    def prepare_step(self, work: list[ScheduledChunk], slots: SlotManager, prefix_writes: list[Row]) -> PreparedStep:
        """The step's inputs, worked out on the host: the chunks' positions get their cache slots
        in the slot table, and `prefix_writes` (admitted prefix-tuned rows) their keys and values
        in the pass that follows."""
        table_rows: list[int] = []
        positions: list[int] = []
        step_slots: list[int] = []
        ids: list[int] = []
        virtual_at: list[int] = []
        virtual_embeddings: list[torch.Tensor] = []
        logits_at: list[int] = []
        sampled_rows: list[Row] = []
        for item in work:
            row, start, end = item.row, item.start, item.end
            virtual = row.num_virtual_tokens
            table_rows += [row.slot_table_row] * item.num_positions
            positions += range(start, end)
            step_slots += slots.slots_for(row, start, end)
            ids += [row.tokens[p - virtual] if p >= virtual else 0 for p in range(start, end)]
            if start < virtual:
                virtual_at += range(item.offset, item.offset + min(end, virtual) - start)
                soft_prompt = row.request.soft_prompt
                assert soft_prompt is not None and soft_prompt.embeddings is not None  # computed virtual positions
                virtual_embeddings.append(soft_prompt.embeddings[start : min(end, virtual)])
            if end == row.num_positions:
                logits_at.append(item.offset + item.num_positions - 1)
                sampled_rows.append(row)
        slots.slot_table[table_rows, positions] = torch.tensor(step_slots)
        inputs = StepInputs()
        ids_in, positions_in, slots_in = inputs.ints(ids), inputs.ints(positions), inputs.ints(step_slots)
        virtual_at_in, logits_at_in = inputs.ints(virtual_at), inputs.ints(logits_at)
        writes = [(row, inputs.ints(slots.slot_table[row.slot_table_row, : row.num_virtual_tokens])) for row in prefix_writes]
        groups = _groups(work, slots.slot_table, inputs)
        sampling_params = SamplingParams.add_to(inputs, [row.sampling for row in sampled_rows])
        return PreparedStep(inputs, ids_in, positions_in, slots_in, virtual_at_in, virtual_embeddings, logits_at_in,
                            sampled_rows, writes, groups, sampling_params)

    def send(self, step: PreparedStep, kv: KVCache) -> None:
        """The step's one host-to-device copy; then prefix-tuned rows' keys and values go into
        their slots."""
        step.inputs.send(self.device)
        for row, prefix_slots in step.prefix_writes:
            soft_prompt = row.request.soft_prompt
            assert soft_prompt is not None and soft_prompt.prefix_kv is not None  # only prefix-tuned rows are written
            prefix_kv = soft_prompt.prefix_kv  # [layers, 2, n, kv_heads, head_dim]
            # an adapter's keys and values may come from anywhere (the host, a training job): to the cache's device
            kv.keys[:, prefix_slots.tensor] = prefix_kv[:, 0].to(kv.keys.device, kv.keys.dtype)
            kv.values[:, prefix_slots.tensor] = prefix_kv[:, 1].to(kv.values.device, kv.values.dtype)

    def run_step(self, step: PreparedStep, kv: KVCache, attention_temporary_bytes: int) -> torch.Tensor:
        """The sent step's forward pass: logits of its sampled rows."""
        embeds = self.embed(step.ids.tensor)
        if step.virtual_embeddings:
            soft = torch.cat(step.virtual_embeddings).to(device=embeds.device, dtype=embeds.dtype)
            embeds.index_copy_(0, step.virtual_at.tensor, soft)
        attention_step = StepAttention(kv.keys, kv.values, step.slots.tensor, [group() for group in step.groups],
                                       attention_temporary_bytes)
        return self.forward(embeds, step.positions.tensor, attention_step, step.logits_at.tensor)


def _groups(work: list[ScheduledChunk], slot_table: torch.Tensor, inputs: StepInputs) -> list[Callable[[], RowGroup]]:
    """Rows attend in groups of the same number of new tokens whose keys fit the same bucket of
    KEY_BUCKET positions, padded to the bucket's end. How a row's attention sums its keys then
    depends on that row alone, never on which rows share its step (softmax and the weighted
    sum of values reduce over the padded length): a row's greedy output is the same alone or
    in any batch, bit for bit. Decoding rows mostly share a few buckets, so they still attend
    in a few batched calls."""
    groups: dict[tuple[int, int], list[ScheduledChunk]] = {}
    for item in work:
        bucket = -(-item.end // KEY_BUCKET)
        groups.setdefault((item.num_positions, bucket), []).append(item)
    return [_group(items, bucket * KEY_BUCKET, slot_table, inputs) for (_, bucket), items in groups.items()]


def _group(items: list[ScheduledChunk], keys: int, slot_table: torch.Tensor, inputs: StepInputs) -> Callable[[], RowGroup]:
    """The group's indices, put in the step's inputs; the returned call makes the group once sent."""
    rows, queries = len(items), items[0].num_positions
    key_lengths = torch.tensor([w.end for w in items])
    # Past a row's own positions its slot table row may hold an earlier row's slots: read the
    # padding block instead, so nothing another row left (even NaN) can reach this one's softmax.
    slots = slot_table[[w.row.slot_table_row for w in items], :keys].masked_fill(torch.arange(keys) >= key_lengths[:, None], 0)
    tokens = inputs.ints([t for w in items for t in range(w.offset, w.offset + w.num_positions)])
    slots_in = inputs.ints(slots)
    query_positions = inputs.ints([p for w in items for p in range(w.start, w.end)], (rows, queries))
    key_lengths_in = inputs.ints(key_lengths)
    return lambda: RowGroup(tokens=tokens.tensor, slots=slots_in.tensor, query_positions=query_positions.tensor,
                            key_lengths=key_lengths_in.tensor, rows=rows, queries=queries, keys=keys)
