"""A slow, obviously-correct greedy decode to check the engine against.

Every step re-runs the full forward pass over `[soft prompt ; prompt ; generated so far]`
with no KV cache (a prefix-tuned adapter's keys and values given as the model's past, as PEFT
gives them). Tests and benchmarks compare the engine's tokens with it.
"""

from dataclasses import dataclass

import torch

from app.engine.loader import BaseModel
from app.engine.prefix_kv import PrefixPast
from app.engine.requests import SoftPrompt, stop_token_ids


def row_embeddings(base: BaseModel, soft_prompt: SoftPrompt | torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """`[soft prompt ; token embeddings]` of one row, [positions, hidden]; a prefix-tuned
    adapter adds keys and values, not inputs, so its rows' inputs are their tokens alone."""
    tokens = base.model.get_input_embeddings()(torch.tensor(ids, device=base.device, dtype=torch.long))
    if isinstance(soft_prompt, SoftPrompt):
        soft_prompt = soft_prompt.embeddings
    if soft_prompt is None:
        return tokens
    return torch.cat([soft_prompt.to(device=tokens.device, dtype=tokens.dtype), tokens])


@torch.inference_mode()
def _next_token_logits(base: BaseModel, soft_prompt: SoftPrompt | torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    embeds = row_embeddings(base, soft_prompt, ids)[None]
    prefix = soft_prompt.prefix_kv if isinstance(soft_prompt, SoftPrompt) else None
    past = None if prefix is None else PrefixPast(prefix.to(base.device, embeds.dtype), base.model.config)
    out = base.model(inputs_embeds=embeds, cache=past, use_cache=past is not None, logits_to_keep=1)
    return out.logits[0, -1].float()


def reference_greedy_decode(
    base: BaseModel, soft_prompt: SoftPrompt | torch.Tensor | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    eos_ids = stop_token_ids(base)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(_next_token_logits(base, soft_prompt, prompt_ids + generated).argmax())
        if token in eos_ids:
            break
        generated.append(token)
    return generated


@dataclass
class ReferenceCheck:
    exact: bool  # identical token for token
    agrees: bool  # identical, or first differs only where the reference itself is near a tie
    diverged_at: int | None
    margin: float | None  # reference logit of its own token minus that of the engine's token


def check_against_reference(
    base: BaseModel, soft_prompt: SoftPrompt | torch.Tensor | None, prompt_ids: list[int], tokens: list[int],
    max_new_tokens: int, tie_tolerance: float = 0.0,
) -> ReferenceCheck:
    """Compare engine output with the reference. With int8 weights, activations are rounded to
    int8 per row, so the few-ulp differences between a cached decode step and a full recompute
    can move a logit by a few tenths; `tie_tolerance` accepts a first divergence only where the
    reference's own choice led the engine's by at most that much. Everything before it must match."""
    reference = reference_greedy_decode(base, soft_prompt, prompt_ids, max_new_tokens)
    if tokens == reference:
        return ReferenceCheck(True, True, None, None)
    step = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    if step >= len(tokens) or step >= len(reference):  # one stopped (EOS) where the other went on
        return ReferenceCheck(False, False, step, None)
    logits = _next_token_logits(base, soft_prompt, prompt_ids + reference[:step])
    margin = float(logits[reference[step]] - logits[tokens[step]])
    return ReferenceCheck(False, margin <= tie_tolerance, step, margin)
