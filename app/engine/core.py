"""The engine core: continuous batching of soft-prompt rows over the paged KV cache.

Every `step()` admits waiting requests while rows and KV blocks allow (each row reserves the blocks
it can ever need, so nothing runs out half-way), then runs ONE forward pass over:
  - one new token for every decoding row, whatever its adapter and length, and
  - prompt chunks of prefilling rows, up to MAX_STEP_TOKENS in all, so a long prompt never
    stalls the decoding rows for more than one chunk;
then samples a token for every row whose known positions are all computed. A row is finished the
moment its last token is chosen, and its slots go back to the pool at once.

A row starts from the longest cached prefix of its adapter (soft prompt, then prompt tokens) and
computes only the rest (a prefix-tuned adapter's positions 0..n-1 are its keys and values, written
into the cache, never computed); when it has computed its prompt, its slots are offered to the prefix
cache. Failures stay with their rows: a request that cannot be prepared is refused alone, a row
whose logits are unusable fails alone, and an out-of-memory sheds the newest row and retries.
Any other exception in a step is an engine fault, which no single row explains: the running rows
fail with `EngineFault`, the core rebuilds its bookkeeping (slot table, KV pool, prefix cache) from
scratch and goes on; waiting requests keep their place. Every tensor the core keeps is allocated
once, at its full size, when the core is built, so no step ever replaces one (a tensor made
inside `torch.inference_mode()` could not be written outside it).

Synchronous and single-threaded: `app.engine.engine.Engine` drives it from its own thread.
"""

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

import torch

from app.engine.detokenize import IncrementalDetokenizer
from app.engine.events import Admitted, EngineEvent, Failed, Finished, TokenAdded
from app.engine.kv_cache import BLOCK_SIZE, KVCache
from app.engine.loader import BaseModel
from app.engine.memory_plan import MemoryPlan
from app.engine.model_runner import ModelRunner
from app.engine.prefix_cache import PrefixCache, PrefixKey
from app.engine.requests import FinishReason, GenerationRequest, GenerationResult, stop_token_ids
from app.engine.rows import Row, ScheduledChunk
from app.engine.sampling import RowSampling, SamplingParams, sample
from app.engine.slots import SlotManager

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 60.0
BASE_MODEL_KEY = PrefixKey("", "")


class RequestTooLarge(ValueError):
    """The request can never fit the KV cache."""


class EngineOverloaded(RuntimeError):
    """The row was shed to relieve memory pressure; the client may retry."""


class RowFailed(RuntimeError):
    """This row alone failed (its logits or its text could not be used)."""


class EngineFault(RuntimeError):
    """A step failed in a way no single row explains; the engine rebuilt its state and goes on."""

    def __init__(self) -> None:
        super().__init__("an internal error in the engine ended this request; the engine recovered, retry it")


class EngineCore:
    """Admission, scheduling and what each step's outputs mean for their rows; where positions
    live is `slots` (app.engine.slots), how a step runs is `runner` (app.engine.model_runner)."""

    def __init__(
        self,
        base: BaseModel,
        kv_tokens: int,
        max_rows: int,
        max_step_tokens: int = 512,
        prefix_cache_tokens: int | None = None,
        max_row_positions: int | None = None,
        memory_plan: MemoryPlan | None = None,
        attention_temporary_bytes: int = 256 << 20,
    ):
        self.base = base
        self.memory_plan = memory_plan  # how the pool was sized, for /health
        self.attention_temporary_bytes = attention_temporary_bytes
        self.runner = ModelRunner(base)
        self.device = base.device
        self.kv = KVCache(base.kv_shape, kv_tokens, base.device)
        self.prefix = PrefixCache(self.kv, kv_tokens if prefix_cache_tokens is None else prefix_cache_tokens)
        self.max_rows = max_rows
        self.max_step_tokens = max(max_step_tokens, max_rows)  # every decoding row fits every step
        self.eos_ids = stop_token_ids(base)
        # The most positions one row may hold: the whole cache, or less where the caller bounds requests.
        capacity = self.kv.capacity_blocks * BLOCK_SIZE
        self.max_row_positions = min(capacity, max_row_positions or capacity)
        self.slots = SlotManager(self.kv, self.prefix, max_rows, self.max_row_positions)
        self._prefix_writes: list[Row] = []  # admitted prefix-tuned rows whose keys and values the next pass writes
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self._admitting: Row | None = None  # the waiting row being admitted, while it is
        self.faults = 0  # engine faults healed
        self.consecutive_faults = 0  # since the last step that went through
        self.logits_hook: Callable[[list[Row], torch.Tensor], None] | None = None  # sees every step's logits
        self.steps = 0
        self.requests_admitted = 0
        self.tokens_generated = 0
        self.rows_stepped = 0  # rows summed over steps: over `steps`, the mean batch size
        self.step_seconds = 0.0  # wall time in forward steps: over a span of time, how busy the engine was
        self.rows_shed = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step

    # -- requests in ----------------------------------------------------------------------------

    def positions_needed(self, request: GenerationRequest) -> int:
        """Worst-case KV positions of a request: the newest token is never fed back."""
        return request.virtual_tokens + len(request.prompt_ids) + request.max_new_tokens - 1

    def check_fits(self, request: GenerationRequest) -> int:
        """The request's worst-case KV positions; RequestTooLarge if the whole cache could not hold them."""
        positions = self.positions_needed(request)
        if positions > self.max_row_positions:
            capacity = self.kv.capacity_blocks * BLOCK_SIZE
            limit = f"the cache holds {capacity}" if self.max_row_positions == capacity else (
                f"one request may hold {self.max_row_positions}")
            raise RequestTooLarge(f"needs {positions} KV cache positions (soft prompt + prompt + max new tokens); {limit}")
        return positions

    def add(self, request: GenerationRequest, handle: object = None, arrived_at: float | None = None) -> Row:
        """Queue a request (`arrived_at`: its perf_counter() arrival, now by default). Raises
        ValueError (RequestTooLarge included) if it can never run."""
        self.check_fits(request)
        soft = request.soft_prompt
        if soft is not None and soft.prefix_kv is not None:
            shape = self.kv.shape
            if tuple(soft.prefix_kv.shape) != (shape.layers, 2, len(soft), shape.kv_heads, shape.head_dim):
                raise ValueError(f"prefix keys and values must be [{shape.layers}, 2, virtual tokens, "
                                 f"{shape.kv_heads}, {shape.head_dim}]")
            if not request.prompt_ids:
                raise ValueError("a prefix-tuned adapter needs a prompt: its prefix gives keys and values, no input")
        elif soft is not None and (soft.values.ndim != 2 or soft.values.shape[1] != self.base.hidden_size):
            raise ValueError(f"soft prompt must be [virtual tokens, {self.base.hidden_size}]")
        vocab_size = self.base.vocab_size
        if any(not 0 <= t < vocab_size for t in request.prompt_ids):
            raise ValueError("prompt has token ids outside the vocabulary")
        if not request.prompt_ids and not request.virtual_tokens:
            raise ValueError("empty prompt and no soft prompt: nothing to continue from")
        row = Row(
            request=request,
            handle=handle,
            prefix_key=BASE_MODEL_KEY if soft is None else PrefixKey(soft.adapter_id, soft.digest),
            num_virtual_tokens=0 if soft is None else len(soft),
            tokens=list(request.prompt_ids),
            sampling=RowSampling.create(request.temperature, request.top_p, request.seed, self.device),
            detokenizer=IncrementalDetokenizer(self.base.tokenizer),
            result=GenerationResult(prompt_tokens=len(request.prompt_ids)),
            enqueued_at=time.perf_counter() if arrived_at is None else arrived_at,
        )
        self.waiting.append(row)
        return row

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def awaiting_first_token(self) -> bool:
        return bool(self.waiting) or any(row.first_token_at is None for row in self.running)

    def drop_adapter(self, adapter_id: str) -> None:
        self.prefix.drop_adapter(adapter_id)

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[EngineEvent]:
        """Admit what fits, then advance every row by one forward pass. Returns the step's
        events (app.engine.events)."""
        return self.admit() + self.forward_step()

    def admit(self) -> list[EngineEvent]:
        """Drop cancelled rows and admit waiting requests while rows and KV blocks allow."""
        events: list[EngineEvent] = []
        try:
            for row in [r for r in self.running if r.request.cancelled.is_set()]:
                self._finish(row, FinishReason.CANCELLED, events)
            self._admit(events)
        except Exception as exc:
            self._heal(exc, events)
        return events

    def forward_step(self) -> list[EngineEvent]:
        """One forward pass over the running rows, and a token for each row it completes."""
        events: list[EngineEvent] = []
        started = time.perf_counter()
        try:
            self._forward_step(events)
        except Exception as exc:
            self._heal(exc, events)
        self.step_seconds += time.perf_counter() - started
        return events

    def _forward_step(self, events: list[EngineEvent]) -> None:
        work = self._plan()
        if not work:
            return
        try:
            logits, sampled_rows, params = self._forward(work)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            self._shed_newest(work, events)  # memory ran short: the newest row goes, the rest go on
            return
        self.consecutive_faults = 0
        self.steps += 1
        self.rows_stepped += len(work)
        for item in work:
            item.row.num_computed_positions += item.num_positions
            item.row.num_steps += 1
            item.row.num_step_rows += len(work)
            if item.row.num_computed_positions == item.row.num_prompt_positions:
                self._offer_prefix(item.row)
        if self.logits_hook is not None:
            self.logits_hook(sampled_rows, logits)
        self._take_tokens(sampled_rows, logits, params, events)

    def _admit(self, events: list[EngineEvent]) -> None:
        while self.waiting and self.slots.has_free_table_row():
            row = self.waiting[0]
            if row.request.cancelled.is_set():
                self.waiting.popleft()
                self._finish(row, FinishReason.CANCELLED, events)
                continue
            self._admitting = row
            prefix_slots = self.slots.reserve(row, self.positions_needed(row.request))
            if prefix_slots is None:
                return  # first come, first served: the head waits for memory, and so do the rest
            self.waiting.popleft()
            row.slot_table_row = self.slots.take_table_row()
            row.admitted_at = time.perf_counter()
            self.running.append(row)
            self.requests_admitted += 1
            events.append(Admitted(row))
            self.slots.map_shared(row, prefix_slots)
            soft_prompt = row.request.soft_prompt
            if row.num_computed_positions < row.num_virtual_tokens and soft_prompt and soft_prompt.prefix_kv is not None:
                # A prefix-tuned row's positions 0..n-1 are the adapter's keys and values, not
                # computed: its own slots get them before the next pass (a later row of that
                # adapter reads them from the prefix cache once this row has offered its prompt).
                self.slots.map_virtual(row)
                row.num_computed_positions = row.num_virtual_tokens
                self._prefix_writes.append(row)
        self._admitting = None

    def _plan(self) -> list[ScheduledChunk]:
        """Decoding rows first (one token each), then prompt chunks in admission order."""
        budget = self.max_step_tokens
        work, offset = [], 0
        for row in self.running:
            if row.num_positions - row.num_computed_positions == 1:
                work.append(ScheduledChunk(row, row.num_computed_positions, 1, offset))
                offset += 1
        budget -= offset
        for row in self.running:
            pending = row.num_positions - row.num_computed_positions
            if pending > 1 and budget > 0:
                count = min(pending, budget)
                work.append(ScheduledChunk(row, row.num_computed_positions, count, offset))
                offset += count
                budget -= count
        return work

    def _forward(self, work: list[ScheduledChunk]) -> tuple[torch.Tensor, list[Row], SamplingParams]:
        """One pass over the step's work. Its inputs are worked out on the host and sent in one copy."""
        prefix_writes = [row for row in self._prefix_writes if row in self.running]
        step = self.runner.prepare_step(work, self.slots, prefix_writes)
        self.runner.send(step, self.kv)
        self._prefix_writes = []
        logits = self.runner.run_step(step, self.kv, self.attention_temporary_bytes)
        return logits, step.sampled_rows, step.sampling_params()

    # -- tokens out -----------------------------------------------------------------------------

    def _take_tokens(self, rows: list[Row], logits: torch.Tensor, params: SamplingParams,
                     events: list[EngineEvent]) -> None:
        if not rows:
            return
        tokens, usable = _sample_rows(logits, [row.sampling for row in rows], params)
        now = time.perf_counter()
        made = 0
        for row, token, ok in zip(rows, tokens, usable):
            try:
                if isinstance(ok, Exception):
                    raise RowFailed(f"sampling failed: {ok}") from ok
                if not ok:
                    raise RowFailed("the model produced non-finite logits for this request")
                if row.first_token_at is None:
                    row.first_token_at = now
                made += 1
                finish = self._accept(row, cast(int, token))  # usable: sampled
            except Exception as exc:  # this row alone
                row.error = exc
                self._release(row)
                events.append(Failed(row))
                continue
            if finish is None:
                events.append(TokenAdded(row))
            else:
                self._finish(row, finish, events)
        self.tokens_generated += made
        now = time.monotonic()
        self._recent.append((now, made))
        while self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def _accept(self, row: Row, token: int) -> FinishReason | None:
        """Record one token; return the finish reason if the row is done."""
        result, request = row.result, row.request
        if token in self.eos_ids:
            result.text += row.detokenizer.finish()
            return FinishReason.STOP
        row.tokens.append(token)
        result.token_ids.append(token)
        seen = len(result.text)
        delta = row.detokenizer.add(token)
        if delta:
            result.text += delta
            longest = max((len(s) for s in request.stop), default=0)
            start = max(seen - longest + 1, 0)  # a stop string may begin in older text
            cut = min((i for s in request.stop if (i := result.text.find(s, start)) >= 0), default=-1)
            if cut >= 0:
                result.text = result.text[:cut]
                return FinishReason.STOP
        if len(result.token_ids) >= request.max_new_tokens:
            result.text += row.detokenizer.finish()
            return FinishReason.LENGTH
        return None

    def _finish(self, row: Row, reason: FinishReason, events: list[EngineEvent]) -> None:
        row.result.finish_reason = reason
        self._release(row)
        events.append(Finished(row))

    def _release(self, row: Row) -> None:
        row.finished_at = time.perf_counter()
        if row in self.running:
            self.running.remove(row)
            self.slots.free_table_row(row.slot_table_row)
        self.slots.release(row)

    def _offer_prefix(self, row: Row) -> None:
        length = row.num_prompt_positions
        self.prefix.offer(row.prefix_key, row.num_virtual_tokens, row.tokens[: row.result.prompt_tokens],
                          self.slots.slot_table[row.slot_table_row, :length])

    def _shed_newest(self, work: list[ScheduledChunk], events: list[EngineEvent]) -> None:
        newest = max((w.row for w in work), key=lambda r: cast(float, r.admitted_at))  # they all run
        newest.error = EngineOverloaded("the server ran short of memory; retry later")
        self.rows_shed += 1
        self._release(newest)
        events.append(Failed(newest))

    def _heal(self, exc: Exception, events: list[EngineEvent]) -> None:
        """An engine fault: fail the running rows, then rebuild the slot table, the KV pool's
        bookkeeping and the prefix cache from scratch (the pool's tensors are kept: every slot is
        written before it is read). Waiting requests keep their place. Raises if it cannot rebuild."""
        rows, admitting = list(self.running), self._admitting
        if admitting is not None and admitting in self.waiting:  # the request whose admission failed goes too
            self.waiting.remove(admitting)
            rows.append(admitting)
        log.error("engine fault: failing %d rows and rebuilding the engine's state", len(rows), exc_info=exc)
        self.faults += 1
        self.consecutive_faults += 1
        self.slots.reset()
        self._prefix_writes = []
        self.running, self._admitting = [], None
        now = time.perf_counter()
        for row in rows:
            row.error = EngineFault()
            row.error.__cause__ = exc
            row.finished_at = now
            row.forget_blocks()
            events.append(Failed(row))

    def fail_all(self, exc: BaseException) -> list[EngineEvent]:
        """Fail every row, running or waiting, touching nothing else: the engine cannot go on."""
        events: list[EngineEvent] = []
        for row in [*self.running, *self.waiting]:
            row.error = exc
            row.finished_at = time.perf_counter()
            events.append(Failed(row))
        self.running, self.waiting = [], deque()
        return events

    # -- numbers --------------------------------------------------------------------------------

    def recent_tokens_per_second(self) -> float:
        """Tokens made per second over the last minute; safe to call from any thread."""
        horizon = time.monotonic() - THROUGHPUT_WINDOW_S
        return sum(tokens for at, tokens in list(self._recent) if at >= horizon) / THROUGHPUT_WINDOW_S

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "steps": self.steps,
            "requests_admitted": self.requests_admitted,
            "tokens_generated": self.tokens_generated,
            "rows_stepped": self.rows_stepped,
            "step_seconds": self.step_seconds,
            "rows_shed": self.rows_shed,
            "faults": self.faults,
            "kv_cache": self.kv.stats(),
            "prefix_cache": self.prefix.stats(),
            "memory_plan": self.memory_plan.as_dict() if self.memory_plan else None,
        }


def _out_of_memory(exc: BaseException) -> bool:
    message = str(exc).lower()
    return (
        isinstance(exc, (torch.OutOfMemoryError, MemoryError))
        or "out of memory" in message
        or "can't allocate memory" in message  # torch's CPU allocator
    )


def _sample_rows(logits: torch.Tensor, rows: list[RowSampling], params: SamplingParams
                 ) -> tuple[Sequence[int | None], Sequence[bool | Exception]]:
    """Sample every row at once; should that raise, row by row (from the same random state), so
    an error fails only the row that causes it."""
    states = [row.generator.get_state() for row in rows if row.generator is not None]
    try:
        return sample(logits, rows, params)
    except Exception:
        log.exception("batched sampling failed: sampling row by row")
    for row in rows:
        if row.generator is not None:
            row.generator.set_state(states.pop(0))
    tokens: list[int | None] = []
    usable: list[bool | Exception] = []
    for i, row in enumerate(rows):
        try:
            [token], [ok] = sample(logits[i : i + 1], [row])
            tokens.append(token)
            usable.append(ok)
        except Exception as exc:
            tokens.append(None)
            usable.append(exc)
    return tokens, usable
