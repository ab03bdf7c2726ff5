"""The prompt-tuning loop: pure torch/transformers, no Celery, no database.

The base model stays frozen; only the soft prompt `[num_virtual_tokens, hidden]` learns. The
loss covers the output tokens only, and logits are computed only at the positions that predict
them: with a 262k vocabulary, full logits would dominate memory.
"""

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.optimization import Adafactor

from app.datasets import Example, render
from app.engine.generation import generate_batch
from app.engine.requests import GenerationRequest
from app.engine.loader import BaseModel
from app.train_config import CHECKPOINT_MIN_TOKENS, TrainConfig

# Eval on more examples than this gets slow on CPU without changing the picture much.
MAX_EVAL_EXAMPLES = 200


@dataclass
class TrainResult:
    prompt_embeddings: torch.Tensor
    steps: int
    best_step: int
    eval_loss: float | None
    eval_accuracy: float | None
    train_examples: int
    eval_examples: int
    seconds: float
    stopped_early: bool
    cancelled: bool


@dataclass
class Hooks:
    """How the loop reports progress and learns it should stop; all optional."""

    on_step: Callable[[int, int, float, float], None] = lambda step, total, epoch, loss: None
    on_eval: Callable[[int, float, float], None] = lambda step, loss, accuracy: None
    should_cancel: Callable[[], bool] = lambda: False


class Cancelled(Exception):
    pass


def target_text(prompt: str, output: str) -> str:
    """The output as the model should continue the prompt: after a space unless the prompt
    already ends in whitespace."""
    return output if not prompt or prompt[-1].isspace() else " " + output


def encode_example(base: BaseModel, example: Example, template: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids ending in EOS). Over-long prompts keep BOS and their end, where a
    template puts the question."""
    tokenizer = base.tokenizer
    prompt_text = render(template, example.input)
    prompt = tokenizer(prompt_text).input_ids
    target = tokenizer(target_text(prompt_text, example.output), add_special_tokens=False).input_ids
    target = target[: max_length - 2] + [tokenizer.eos_token_id]
    budget = max_length - len(target)
    if len(prompt) > budget:
        prompt = prompt[:1] + prompt[len(prompt) - budget + 1 :]
    return prompt, target


def init_prompt(base: BaseModel, config: TrainConfig, examples: list[Example]) -> torch.Tensor:
    """Initial soft prompt, in the space of the model's (scaled) input embeddings."""
    n, embed = config.num_virtual_tokens, base.model.get_input_embeddings()
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = base.tokenizer
    if config.init == "random":
        scale = embed(torch.arange(1000, device=base.device)).float().std()
        return torch.randn(n, base.hidden_size, generator=generator) * scale.cpu()
    if config.init == "vocab":
        ids = torch.randint(0, min(5000, embed.num_embeddings), (n,), generator=generator).tolist()
    else:
        if config.init == "text":
            text = config.init_text or ""
        else:  # labels: the distinct outputs, most frequent first
            counts: dict[str, int] = {}
            for example in examples:
                counts[example.output] = counts.get(example.output, 0) + 1
            text = " ".join(sorted(counts, key=lambda label: -counts[label]))
        ids = tokenizer(text, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
        ids = (ids * math.ceil(n / len(ids)))[:n]  # cycle to fill every virtual token
    with torch.no_grad():
        return embed(torch.tensor(ids, device=base.device)).float().cpu()


def _output_logits(base: BaseModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = base.model.get_output_embeddings()(hidden).float()
    cap = getattr(base.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_losses(base: BaseModel, prompt: torch.Tensor | None, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Cross-entropy of every target token, in batch order, with `prompt` (if any) before each row."""
    embed = base.model.get_input_embeddings()
    n_virtual = 0 if prompt is None else prompt.shape[0]
    rows = [p + t for p, t in batch]
    width = max(len(r) for r in rows)
    pad = base.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=base.device)
    mask = torch.tensor([[1] * (n_virtual + len(r)) + [0] * (width - len(r)) for r in rows], device=base.device)
    inputs = embed(ids)
    if prompt is not None:
        soft = prompt.to(base.embed_dtype).unsqueeze(0).expand(len(rows), -1, -1)
        inputs = torch.cat([soft, inputs], dim=1)
    hidden = base.model.model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
    # The hidden state at position i predicts token i+1: gather only the positions before each target token.
    row_index, positions, targets = [], [], []
    for r, (p, t) in enumerate(batch):
        start = n_virtual + len(p) - 1
        row_index += [r] * len(t)
        positions += range(start, start + len(t))
        targets += t
    picked = hidden[torch.tensor(row_index), torch.tensor(positions)]
    return F.cross_entropy(_output_logits(base, picked), torch.tensor(targets, device=base.device), reduction="none")


def batch_loss(base: BaseModel, prompt: torch.Tensor, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, with `prompt` prepended to every row."""
    return target_losses(base, prompt, batch).mean()


@torch.no_grad()
def label_choice_accuracy(base: BaseModel, prompt: torch.Tensor | None, examples: list[Example], template: str,
                          max_length: int, batch_size: int = 16) -> float:
    """Share of examples where the right output is the likeliest of the task's outputs: the model
    chooses among the labels instead of generating freely (a fair zero-shot baseline)."""
    labels = sorted({e.output for e in examples})
    scores = torch.empty(len(examples), len(labels))
    for j, label in enumerate(labels):
        pairs = [encode_example(base, Example(e.input, label), template, max_length) for e in examples]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            per_token = target_losses(base, prompt, chunk).float().cpu()
            sizes = [len(t) - 1 for _, t in chunk]  # the label's own tokens; EOS is not scored
            pieces = per_token.split([len(t) for _, t in chunk])
            scores[start : start + len(chunk), j] = torch.stack([p[:n].sum() for p, n in zip(pieces, sizes)])
    chosen = scores.argmin(dim=1)
    return sum(labels[int(c)] == e.output for c, e in zip(chosen, examples)) / len(examples)


def wants_checkpointing(setting: bool | None, batch: list[tuple[list[int], list[int]]], num_virtual_tokens: int) -> bool:
    if setting is not None:
        return setting
    return len(batch) * (num_virtual_tokens + max(len(p) + len(t) for p, t in batch)) >= CHECKPOINT_MIN_TOKENS


@contextmanager
def gradient_checkpointing(base: BaseModel, enabled: bool) -> Iterator[None]:
    """Recompute layer activations in backward instead of storing them: memory stays close to
    inference at ~30% more compute. transformers only checkpoints in train mode; Gemma has no
    dropout, so train mode changes nothing else."""
    if not enabled:
        yield
        return
    base.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.model.train()
    try:
        yield
    finally:
        base.model.activation_checkpointing_disable()
        base.model.eval()


@torch.no_grad()
def exact_match_accuracy(base: BaseModel, prompt: torch.Tensor | None, examples: list[Example], template: str,
                         max_length: int) -> float:
    """Share of examples whose greedy generation, up to a newline, equals the output."""
    encoded = [encode_example(base, e, template, max_length) for e in examples]
    longest = max(len(t) for _, t in encoded)
    soft = None if prompt is None else prompt.to(base.device, base.embed_dtype)
    requests = [GenerationRequest(prompt_ids=p, soft_prompt=soft, max_new_tokens=longest, stop=["\n"]) for p, _ in encoded]
    correct = 0
    for start in range(0, len(requests), 32):
        results = generate_batch(base, requests[start : start + 32])
        correct += sum(r.text.strip() == e.output.strip() for r, e in zip(results, examples[start : start + 32]))
    return correct / len(examples)


@torch.no_grad()
def evaluate(base: BaseModel, prompt: torch.Tensor, examples: list[Example], config: TrainConfig) -> tuple[float, float]:
    """(mean loss, exact-match accuracy) on `examples`."""
    encoded = [encode_example(base, e, config.template, config.max_length) for e in examples]
    losses = []
    for start in range(0, len(encoded), config.batch_size):
        chunk = encoded[start : start + config.batch_size]
        losses.append(float(batch_loss(base, prompt, chunk)) * len(chunk))
    accuracy = exact_match_accuracy(base, prompt, examples, config.template, config.max_length)
    return sum(losses) / len(encoded), accuracy


def split_eval(examples: list[Example], validation: list[Example] | None, seed: int) -> tuple[list[Example], list[Example]]:
    """Validation set as given, or a held-out slice of train (10%, at most MAX_EVAL_EXAMPLES)."""
    if validation:
        return examples, validation[:MAX_EVAL_EXAMPLES]
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    held = min(MAX_EVAL_EXAMPLES, max(1, len(shuffled) // 10)) if len(shuffled) > 1 else 0
    return (shuffled[held:], shuffled[:held]) if held else (shuffled, shuffled)


def train_prompt(
    base: BaseModel, config: TrainConfig, examples: list[Example], validation: list[Example] | None = None,
    hooks: Hooks | None = None,
) -> TrainResult:
    hooks = hooks or Hooks()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    train, held_out = split_eval(examples, validation, config.seed)
    encoded = [encode_example(base, e, config.template, config.max_length) for e in train]
    prompt = torch.nn.Parameter(init_prompt(base, config, train).to(base.device))
    optimizer = Adafactor([prompt], lr=config.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    total = config.total_steps(len(encoded))
    order_rng = random.Random(config.seed)
    order: list[int] = []
    best = (float("-inf"), float("-inf"))  # (accuracy, -loss): higher is better
    best_prompt, best_step, best_loss, best_accuracy = prompt.detach().clone(), 0, None, None
    evals_without_gain, stopped_early, step = 0, False, 0
    try:
        for step in range(1, total + 1):
            if hooks.should_cancel():
                raise Cancelled
            if len(order) < config.batch_size:
                fresh = list(range(len(encoded)))
                order_rng.shuffle(fresh)
                order += fresh
            indices, order = order[: config.batch_size], order[config.batch_size :]
            optimizer.zero_grad(set_to_none=True)
            batch = [encoded[i] for i in indices]
            with gradient_checkpointing(base, wants_checkpointing(config.gradient_checkpointing, batch, len(prompt))):
                loss = batch_loss(base, prompt, batch)
                loss.backward()
            optimizer.step()
            hooks.on_step(step, total, step * config.batch_size / len(encoded), loss.item())
            out_of_time = config.time_budget_s is not None and time.perf_counter() - started >= config.time_budget_s
            if step % config.eval_every == 0 or step == total or out_of_time:
                eval_loss, accuracy = evaluate(base, prompt.detach(), held_out, config)
                hooks.on_eval(step, eval_loss, accuracy)
                if (accuracy, -eval_loss) > best:
                    best = (accuracy, -eval_loss)
                    best_prompt, best_step, best_loss, best_accuracy = prompt.detach().clone(), step, eval_loss, accuracy
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
                    if evals_without_gain >= config.early_stopping_patience:
                        stopped_early = True
                        break
            if out_of_time:
                break
    except Cancelled:
        return TrainResult(best_prompt.cpu(), step - 1, best_step, best_loss, best_accuracy, len(train),
                           len(held_out), time.perf_counter() - started, False, True)
    return TrainResult(best_prompt.cpu(), step, best_step, best_loss, best_accuracy, len(train), len(held_out),
                       time.perf_counter() - started, stopped_early, False)
