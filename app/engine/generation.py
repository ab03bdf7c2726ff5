"""Batched generation where every row carries its own soft prompt.

Each row's input is `[soft prompt ; token embeddings]`, left-padded to the longest row, so one
prefill and one decode step per token serve rows that use different adapters. We do the
soft-prompt injection ourselves instead of calling `PeftModel.generate()`, whose cached
path with prompt tuning gives wrong tokens after the first one on current peft/transformers.
"""

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from app.engine.loader import BaseModel


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    soft_prompt: torch.Tensor | None  # [num_virtual_tokens, hidden], or None for the base model
    max_new_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    # Set from another thread (a streaming client left): the row leaves the batch at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS or a stop string), "length", or "cancelled"
    prompt_tokens: int = 0


# Called after every token of every row: (row index, result so far, whether the row is finished).
StepCallback = Callable[[int, GenerationResult, bool], None]


def stop_token_ids(base: BaseModel) -> set[int]:
    ids = {base.tokenizer.eos_token_id}
    configured = getattr(base.model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _row_embeddings(base: BaseModel, request: GenerationRequest) -> torch.Tensor:
    embed = base.model.get_input_embeddings()
    tokens = embed(torch.tensor(request.prompt_ids, device=base.device))
    if request.soft_prompt is None:
        return tokens
    return torch.cat([request.soft_prompt.to(device=tokens.device, dtype=tokens.dtype), tokens])


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    batch = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        batch[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return batch, mask


class _RowState:
    """Sampling state and output of one row while its batch decodes."""

    def __init__(self, request: GenerationRequest, device: torch.device):
        self.request = request
        self.result = GenerationResult(prompt_tokens=len(request.prompt_ids))
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator(device=device)
            if request.seed is not None:
                self.generator.manual_seed(request.seed)
            else:
                self.generator.seed()

    def choose(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.request.temperature, dim=-1)
        if self.request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.request.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, token: int, tokenizer, eos_ids: set[int]) -> bool:
        """Record one token; return True when the row is finished."""
        if token in eos_ids:
            self.result.finish_reason = "stop"
            return True
        self.result.token_ids.append(token)
        self.result.text = tokenizer.decode(self.result.token_ids, skip_special_tokens=True)
        cut = min((i for s in self.request.stop if (i := self.result.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.result.text = self.result.text[:cut]
            self.result.finish_reason = "stop"
            return True
        return len(self.result.token_ids) >= self.request.max_new_tokens


def _prefill(base: BaseModel, requests: Sequence[GenerationRequest]):
    """One forward pass over every row's `[soft prompt ; prompt]`; returns the output, the
    attention mask, the position ids and the KV cache the decode steps continue from."""
    inputs, mask = _left_pad([_row_embeddings(base, r) for r in requests])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=base.model.config)
    out = base.model(
        inputs_embeds=inputs,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out, mask, positions, cache


@torch.inference_mode()
def first_step_logits(base: BaseModel, requests: Sequence[GenerationRequest]) -> torch.Tensor:
    """The next-token logits [batch, vocab] the engine samples its first token from."""
    return _prefill(base, requests)[0].logits[:, -1, :].float()


@torch.inference_mode()
def generate_batch(
    base: BaseModel,
    requests: Sequence[GenerationRequest],
    on_step: StepCallback | None = None,
) -> list[GenerationResult]:
    """Generate for all requests in one batch; rows leave the batch as they finish."""
    model, eos_ids = base.model, stop_token_ids(base)
    states = [_RowState(r, base.device) for r in requests]
    out, mask, positions, cache = _prefill(base, requests)
    active = list(range(len(states)))  # indices into `states` of rows still in the batch
    while True:
        logits = out.logits[:, -1, :].float()
        next_tokens, keep = [], []
        for row, index in enumerate(active):
            state = states[index]
            if state.request.cancelled.is_set():
                state.result.finish_reason, finished = "cancelled", True
            else:
                finished = state.accept(state.choose(logits[row]), base.tokenizer, eos_ids)
            if on_step is not None:
                on_step(index, state.result, finished)
            if not finished:
                keep.append(row)
                next_tokens.append(state.result.token_ids[-1])
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows so they cost nothing more
            rows = torch.tensor(keep, device=base.device)
            cache.batch_select_indices(rows)
            mask, positions = mask[rows], positions[rows]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=torch.tensor(next_tokens, device=base.device)[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
    return [s.result for s in states]
