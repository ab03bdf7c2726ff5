"""The prompt- and prefix-tuning loop: pure torch/transformers, no Celery, no database.

The base model stays frozen; only the virtual tokens learn (`VirtualTokens`, which carries the
job's PEFT method): a soft prompt `[num_virtual_tokens, hidden]` (prompt tuning), or every layer's
keys and values at positions 0..n-1 (prefix tuning), learned directly or through PEFT's
reparameterization MLP (`Trainable`). Each example is one token sequence with a loss mask (`Row`):
an input/output pair is the rendered prompt then the output, the loss on the output; a chat is
rendered by app.chat_template exactly as /v1/chat/completions renders it, the loss on the assistant
turns it learns. Logits are computed only at the positions that predict those tokens: with a 262k
vocabulary, full logits would dominate memory.

Every computation on the model is a work item handed to a `Device` (app.engine.device): on a
node that serves, the engine runs it on its own thread between serving steps, and the model is
called through a view (app.engine.model_view) that pauses for serving between layers. Where the
device bounds how long training may hold it, a step's batch is split into micro-batches whose
gradients add up to the whole batch's (gradient accumulation), sized so that one stretch between
pause points stays within the bound.
"""

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import compress

import torch
import torch.nn.functional as F
from transformers.optimization import Adafactor

from app import chat_template
from app.datasets import ChatExample, Dataset, Example, render
from app.engine.device import Device, InlineDevice, let_serving_run
from app.engine.generation import generate_batch
from app.engine.loader import BaseModel
from app.engine.memory_plan import TRAIN_PROFILE_ROWS, TRAIN_PROFILE_TOKENS
from app.engine.model_view import pause_in_backward, training_view
from app.engine.prefix_kv import PrefixPast, from_flat, to_flat
from app.engine.requests import GenerationRequest, SoftPrompt, stop_token_ids
from app.train_config import CHECKPOINT_MIN_TOKENS, Method, TrainConfig
from worker.train_state import TrainState, shuffler_from


@dataclass(frozen=True)
class Row:
    """One training sequence: its token ids, and for each whether the loss covers it (never the
    first: nothing before it predicts it)."""

    ids: list[int]
    scored: list[bool]

    @classmethod
    def of(cls, prompt: list[int], target: list[int]) -> "Row":
        """A prompt, then the target the loss covers."""
        return cls(prompt + target, [False] * len(prompt) + [True] * len(target))

    @property
    def targets(self) -> int:
        return sum(self.scored)

    def last_turn(self) -> tuple[list[int], list[int]]:
        """(what comes before the last scored stretch, that stretch): the prompt and the reply an
        evaluation generates and checks."""
        start = len(self.ids)
        while start > 1 and self.scored[start - 1]:
            start -= 1
        return self.ids[:start], self.ids[start:]


Batch = list[Row]

# Eval on more examples than this gets slow on CPU without changing the picture much.
MAX_EVAL_EXAMPLES = 200


@dataclass(frozen=True)
class VirtualTokens:
    """What a job learns, as the model sees it, with the PEFT method that says how to read it:
    input embeddings [n, hidden] (prompt_tuning) or every layer's keys and values
    [layers, 2, n, kv_heads, head_dim] (prefix_tuning)."""

    method: Method
    values: torch.Tensor

    @property
    def is_prefix(self) -> bool:
        return self.method == "prefix_tuning"

    def __len__(self) -> int:
        return self.values.shape[2 if self.is_prefix else 0]

    def peft_tensor(self) -> torch.Tensor:
        """As PEFT saves it and softserve serves it: a prefix flattened to [n, layers * 2 * kv_heads * head_dim]."""
        return to_flat(self.values) if self.is_prefix else self.values

    def detached(self) -> "VirtualTokens":
        return VirtualTokens(self.method, self.values.detach().clone())

    def to(self, *args) -> "VirtualTokens":
        return VirtualTokens(self.method, self.values.to(*args))


@dataclass
class TrainResult:
    learned: VirtualTokens  # the best evaluated, on the CPU
    steps: int
    best_step: int
    eval_loss: float | None
    eval_accuracy: float | None
    train_examples: int
    eval_examples: int
    seconds: float
    stopped_early: bool
    cancelled: bool
    paused: bool = False  # stopped at a step boundary as asked, its state handed to on_state


@dataclass
class Hooks:
    """How the loop reports progress and learns it should stop; all optional."""

    on_step: Callable[[int, int, float, float], None] = lambda step, total, epoch, loss: None
    on_eval: Callable[[int, float, float], None] = lambda step, loss, accuracy: None
    should_cancel: Callable[[], bool] = lambda: False
    # After each evaluation the run goes on from, and at a pause: the state to go on from
    # (worker.train_state). False: it could not be stored (then a pause does not stop the run).
    on_state: Callable[[TrainState], bool | None] = lambda state: None
    # Checked at each step boundary: stop there, once on_state has stored the state to go on from later.
    should_pause: Callable[[], bool] = lambda: False
    # An evaluation improved the best result: (step, the prompt evaluated, eval loss, accuracy).
    on_best: Callable[[int, VirtualTokens, float, float], None] = lambda step, prompt, loss, accuracy: None


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


def encode_chat(base: BaseModel, example: ChatExample, max_length: int) -> Row:
    """A chat as /v1/chat/completions renders it, the loss on the assistant turns it learns.
    Over-long chats keep BOS and their end, where the last turn learnt is."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    ids, scored = chat_template.encode_conversation(base.tokenizer, messages, example.trained, stop_token_ids(base))
    if len(ids) > max_length:
        ids, scored = ids[:1] + ids[len(ids) - max_length + 1 :], [False] + scored[len(ids) - max_length + 1 :]
    return Row(ids, scored)


def encode_row(base: BaseModel, example: Example | ChatExample, template: str, max_length: int) -> Row:
    """The training sequence of either kind of example (a template lays out input/output pairs only)."""
    if isinstance(example, ChatExample):
        return encode_chat(base, example, max_length)
    return Row.of(*encode_example(base, example, template, max_length))


def _init_ids(base: BaseModel, config: TrainConfig, examples: Dataset, generator: torch.Generator) -> list[int]:
    """The n tokens a non-random init starts from."""
    n, tokenizer = config.num_virtual_tokens, base.tokenizer
    if config.init == "vocab":
        ids = torch.randint(0, min(5000, base.model.get_input_embeddings().num_embeddings), (n,), generator=generator).tolist()
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
    return ids


def init_prompt(base: BaseModel, config: TrainConfig, examples: Dataset) -> torch.Tensor:
    """Initial soft prompt, in the space of the model's (scaled) input embeddings."""
    n, embed = config.num_virtual_tokens, base.model.get_input_embeddings()
    generator = torch.Generator().manual_seed(config.seed)
    if config.init == "random":
        scale = embed(torch.arange(min(1000, embed.num_embeddings), device=base.device)).float().std()
        return torch.randn(n, base.hidden_size, generator=generator) * scale.cpu()
    with torch.no_grad():
        return embed(torch.tensor(_init_ids(base, config, examples, generator), device=base.device)).float().cpu()


def init_prefix(base: BaseModel, config: TrainConfig, examples: Dataset) -> torch.Tensor:
    """Initial keys and values [layers, 2, n, kv_heads, head_dim]: those the model computes for the
    init text (real activations), or for `random` standard normal ones (PEFT's initial prefix)."""
    shape, n = base.kv_shape, config.num_virtual_tokens
    generator = torch.Generator().manual_seed(config.seed)
    if config.init == "random":
        return torch.randn((shape.layers, 2, n, shape.kv_heads, shape.head_dim), generator=generator)
    ids = torch.tensor([_init_ids(base, config, examples, generator)], device=base.device)
    with torch.no_grad():
        cache = base.model(input_ids=ids, use_cache=True).past_key_values
    layers = [(layer.keys[0, :, -n:], layer.values[0, :, -n:]) for layer in cache.layers]  # [kv_heads, n, head_dim]
    return torch.stack([torch.stack(kv) for kv in layers]).transpose(2, 3).float().cpu()


class Trainable(torch.nn.Module):
    """What a job learns; calling it gives the virtual tokens the model sees: a soft prompt [n, hidden],
    or a prefix's keys and values [layers, 2, n, kv_heads, head_dim]. With prefix_projection it is
    PEFT's PrefixEncoder as it trains (an embedding [n, kv_heads * head_dim] through
    Linear-Tanh-Linear, hidden size wide); its output bias starts at the init's keys and values,
    averaged over the virtual tokens (one bias serves them all). `start`: an adapter's values to
    warm-start from instead of the init (the same method and size; not through the MLP, which the
    adapter does not keep)."""

    def __init__(self, base: BaseModel, config: TrainConfig, examples: Dataset, start: VirtualTokens | None = None):
        super().__init__()
        self.method, self.shape, self.mlp = config.method, base.kv_shape, None
        if start is not None:
            if start.method != config.method or len(start) != config.num_virtual_tokens or config.prefix_projection:
                raise ValueError("a warm start needs the job's method and size, without prefix_projection")
            self.prompt = torch.nn.Parameter(start.values.detach().float().cpu().clone())
            return
        if config.method == "prompt_tuning":
            self.prompt = torch.nn.Parameter(init_prompt(base, config, examples))
            return
        init = init_prefix(base, config, examples)
        if not config.prefix_projection:
            self.prompt = torch.nn.Parameter(init)
            return
        width = self.shape.kv_heads * self.shape.head_dim
        self.prompt = torch.nn.Parameter(torch.randn(config.num_virtual_tokens, width))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, base.hidden_size), torch.nn.Tanh(),
                                       torch.nn.Linear(base.hidden_size, self.shape.layers * 2 * width))
        if config.init != "random":
            with torch.no_grad():
                self.mlp[2].bias.copy_(to_flat(init).mean(0))

    def forward(self) -> VirtualTokens:
        values = self.prompt if self.mlp is None else from_flat(self.mlp(self.prompt), self.shape)
        return VirtualTokens(self.method, values)


def _output_logits(base: BaseModel, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's own forward makes of final hidden states: its LM head, then its final-logit
    softcapping where the config has one (Gemma 2 and 3)."""
    logits = base.model.get_output_embeddings()(hidden).float()
    cap = getattr(base.model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_losses(base: BaseModel, prompt: VirtualTokens | None, batch: Batch,
                  model: torch.nn.Module | None = None) -> torch.Tensor:
    """Cross-entropy of every scored token, in batch order, with `prompt` (if any) before each row:
    a soft prompt [n, hidden] before its inputs, or a prefix [layers, 2, n, kv_heads, head_dim] as
    its past. `model`: the base model or a training view of it (the default: the model itself)."""
    embed = base.model.get_input_embeddings()
    n_virtual = 0 if prompt is None else len(prompt)
    rows = [row.ids for row in batch]
    width = max(len(r) for r in rows)
    pad = base.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=base.device)
    mask = torch.tensor([[1] * (n_virtual + len(r)) + [0] * (width - len(r)) for r in rows], device=base.device)
    inputs, past, n_inputs = embed(ids), None, 0  # n_inputs: soft-prompt positions in the inputs
    if prompt is not None and not prompt.is_prefix:
        soft = prompt.values.to(base.embed_dtype).unsqueeze(0).expand(len(rows), -1, -1)
        inputs, n_inputs = torch.cat([soft, inputs], dim=1), n_virtual
    elif prompt is not None:
        past = PrefixPast(prompt.values.to(base.embed_dtype), base.model.config, rows=len(rows))
    # `base_model` is the body of any transformers causal LM (Llama's `model`, GPT-2's `transformer`,
    # GPT-NeoX's `gpt_neox`): its last hidden state is after the final norm, ready for the head.
    body = (model or base.model).base_model
    hidden = body(inputs_embeds=inputs, attention_mask=mask, cache=past, use_cache=False).last_hidden_state
    # The hidden state at position i predicts token i+1: gather only the positions before each target token.
    row_index, positions, targets = [], [], []
    for r, row in enumerate(batch):
        scored = [i for i, covered in enumerate(row.scored) if covered]
        row_index += [r] * len(scored)
        positions += [n_inputs + i - 1 for i in scored]
        targets += list(compress(row.ids, row.scored))
    picked = hidden[torch.tensor(row_index), torch.tensor(positions)]
    # The LM head reads all its weights whatever the rows: pause points around it (a no-op where
    # nothing serves) keep its forward and its backward apart from the layers'.
    let_serving_run(base.model)
    logits = _output_logits(base, picked)
    pause_in_backward(logits, base.model)
    return F.cross_entropy(logits, torch.tensor(targets, device=base.device), reduction="none")


@torch.no_grad()
def label_choice_accuracy(base: BaseModel, prompt: VirtualTokens | None, examples: list[Example], template: str,
                          max_length: int, batch_size: int = 16) -> float:
    """Share of examples where the right output is the likeliest of the task's outputs: the model
    chooses among the labels instead of generating freely (a fair zero-shot baseline)."""
    labels = sorted({e.output for e in examples})
    scores = torch.empty(len(examples), len(labels))
    for j, label in enumerate(labels):
        rows = [Row.of(*encode_example(base, Example(e.input, label), template, max_length)) for e in examples]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            per_token = target_losses(base, prompt, chunk).float().cpu()
            sizes = [row.targets - 1 for row in chunk]  # the label's own tokens; EOS is not scored
            pieces = per_token.split([row.targets for row in chunk])
            scores[start : start + len(chunk), j] = torch.stack([p[:n].sum() for p, n in zip(pieces, sizes)])
    chosen = scores.argmin(dim=1)
    return sum(labels[int(c)] == e.output for c, e in zip(chosen, examples)) / len(examples)


def wants_checkpointing(setting: bool | None, batch: Batch, num_virtual_tokens: int, on_gpu: bool = False) -> bool:
    """The job's setting, else: always on a GPU (its memory plan reserved room for a checkpointed
    micro-step, app.engine.memory_plan), elsewhere where activations would dominate memory."""
    if setting is not None:
        return setting
    return on_gpu or len(batch) * (num_virtual_tokens + max(len(row.ids) for row in batch)) >= CHECKPOINT_MIN_TOKENS


class MicroBatches:
    """How many rows of a batch one work item takes. With no bound on the device: all of them.
    Otherwise sizes are tried from one row up, doubling, and the largest whose stretches between
    pause points stay within the budget is kept; a larger size that once overran is tried again
    every RETRY_EVERY items (one slow stretch may have been noise). Part of a stretch does not
    shrink with fewer rows (the LM head reads all its weights for one row as for eight): where
    even one row overruns the budget, the largest size no more than 10% slower than the fastest is
    kept, since smaller ones would only make training slower.

    With `max_tokens` (a GPU node, whose memory plan reserved room for one checkpointed micro-step
    of that many positions, soft prompt included), each micro-batch is also cut to fit it, rows
    padded to the longest as the trainer pads them. A row longer than that cannot be cut: it goes
    alone, and may need more memory than was reserved."""

    RETRY_EVERY = 20

    def __init__(self, device: Device, batch_size: int, max_tokens: int | None = None, virtual_tokens: int = 0):
        self.device, self.limit = device, batch_size
        self.max_tokens, self.virtual_tokens = max_tokens, virtual_tokens
        self.rows = batch_size if device.step_budget_s is None else 1
        self.longest: dict[int, float] = {}  # rows -> longest stretch (moving average)
        self._since_retry = 0

    def split(self, batch: Batch) -> list[Batch]:
        pieces = [batch[i : i + self.rows] for i in range(0, len(batch), self.rows)]
        if self.max_tokens is None:
            return pieces
        return [part for piece in pieces for part in self._within_tokens(piece)]

    def _within_tokens(self, rows: Batch) -> list[Batch]:
        parts: list[Batch] = [[]]
        for row in rows:
            grown = parts[-1] + [row]
            if len(grown) > 1 and len(grown) * (self.virtual_tokens + max(len(r.ids) for r in grown)) > self.max_tokens:
                parts.append([row])
            else:
                parts[-1] = grown
        return parts

    def observe(self) -> None:
        """After each work item: choose the next size from its longest stretch."""
        budget, seen = self.device.step_budget_s, self.device.last_longest_piece_s
        if budget is None:
            return
        before = self.longest.get(self.rows)
        self.longest[self.rows] = seen if before is None else 0.7 * before + 0.3 * seen
        bound = max(budget, 1.1 * min(self.longest.values()))
        best = max(rows for rows, longest in self.longest.items() if longest <= bound)
        bigger = min(self.limit, best * 2)
        self._since_retry += 1
        if bigger > best and (bigger not in self.longest or self._since_retry >= self.RETRY_EVERY):
            self.longest.pop(bigger, None)  # measured afresh
            best, self._since_retry = bigger, 0
        self.rows = best


def _accumulate(base: BaseModel, model: torch.nn.Module, trainable: Trainable, rows: Batch, targets: int,
                scaler: torch.amp.GradScaler) -> float:
    """One micro-batch's share of the batch's mean loss, backpropagated into the trainable's
    gradients (scaled, where the model computes in float16): the shares of a batch's micro-batches
    add up to the whole batch's gradient. Returns the loss sum."""
    loss_sum = target_losses(base, trainable(), rows, model).sum()
    scaler.scale(loss_sum / targets).backward()
    return float(loss_sum.detach())


@torch.no_grad()
def exact_match_accuracy(base: BaseModel, prompt: VirtualTokens | None, examples: Dataset, template: str,
                         max_length: int, device: Device = InlineDevice()) -> float:
    """Share of examples whose greedy generation equals the output: for an input/output pair, its
    text up to a newline; for a chat, the reply to the messages before its last turn learnt, to
    the end of the reply. On a node that serves, the generation runs through the serving engine's
    queue and pool, as any client's."""
    encoded = [encode_row(base, e, template, max_length).last_turn() for e in examples]
    longest = max(len(t) for _, t in encoded)
    soft = None
    if prompt is not None:  # keyed by its content: no other prompt's cached prefix is ever read for it
        values = prompt.values.to(base.device, base.embed_dtype)
        soft = SoftPrompt.prefix(values) if prompt.is_prefix else SoftPrompt(values)
    requests = [GenerationRequest(prompt_ids=p, soft_prompt=soft, max_new_tokens=longest,
                                  stop=[] if isinstance(e, ChatExample) else ["\n"])
                for (p, _), e in zip(encoded, examples)]
    # Beside serving, each generation step is a work item of its own: keep them decode-sized.
    step_tokens = 512 if device.step_budget_s is None else 64
    correct = 0
    for start in range(0, len(requests), 32):
        chunk = requests[start : start + 32]
        results = device.generate(chunk) if device.serves else generate_batch(base, chunk, device, step_tokens)
        correct += sum(r.text.strip() == e.output.strip() for r, e in zip(results, examples[start : start + 32]))
    return correct / len(examples)


def evaluate(base: BaseModel, prompt: VirtualTokens, examples: Dataset, config: TrainConfig,
             device: Device = InlineDevice(), sizes: MicroBatches | None = None) -> tuple[float, float]:
    """(mean loss per target token, exact-match accuracy) on `examples`."""
    sizes = sizes or MicroBatches(device, config.batch_size)
    view = training_view(base.model, checkpointed=False)

    @torch.no_grad()
    def loss_sum(rows: Batch) -> tuple[float, int]:
        return float(target_losses(base, prompt, rows, view).sum()), sum(row.targets for row in rows)

    encoded = [encode_row(base, e, config.template, config.max_length) for e in examples]
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), config.batch_size):
        for rows in sizes.split(encoded[start : start + config.batch_size]):
            rows_loss, rows_tokens = device.run_training_work(partial(loss_sum, rows))
            total, tokens = total + rows_loss, tokens + rows_tokens
            sizes.observe()
    accuracy = exact_match_accuracy(base, prompt, examples, config.template, config.max_length, device)
    return total / tokens, accuracy


def split_eval(examples: Dataset, validation: Dataset | None, seed: int) -> tuple[Dataset, Dataset]:
    """Validation set as given, or a held-out slice of train (10%, at most MAX_EVAL_EXAMPLES)."""
    if validation:
        return examples, validation[:MAX_EVAL_EXAMPLES]
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    held = min(MAX_EVAL_EXAMPLES, max(1, len(shuffled) // 10)) if len(shuffled) > 1 else 0
    return (shuffled[held:], shuffled[:held]) if held else (shuffled, shuffled)


def make_optimizer(trainable: Trainable, config: TrainConfig) -> torch.optim.Optimizer:
    """Adafactor for a soft prompt (Lester et al.), AdamW for a prefix (PEFT, P-tuning v2)."""
    if config.method == "prompt_tuning":
        return Adafactor(trainable.parameters(), lr=config.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    return torch.optim.AdamW(trainable.parameters(), lr=config.learning_rate, weight_decay=0.0)


def _snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state as it is now, copied to the CPU (the live one changes every step)."""
    state = copy.deepcopy(optimizer.state_dict())
    for entries in state["state"].values():
        for name, value in entries.items():
            if torch.is_tensor(value):
                entries[name] = value.cpu()
    return state


def train_adapter(
    base: BaseModel, config: TrainConfig, examples: Dataset, validation: Dataset | None = None,
    hooks: Hooks | None = None, device: Device = InlineDevice(), resume: TrainState | None = None,
    start: VirtualTokens | None = None,
) -> TrainResult:
    """Train a soft prompt or a prefix, as `config.method` says, from the start (the init, or an
    adapter's values: `start`) or from a state saved by an earlier run of the same job (`resume`:
    at an evaluation or a pause), which then goes on exactly as the earlier run would have."""
    hooks = hooks or Hooks()
    started = time.perf_counter() - (resume.elapsed_s if resume else 0.0)
    torch.manual_seed(config.seed)
    if validation and type(validation[0]) is not type(examples[0]):
        raise ValueError("the validation data and the training data are in different formats (chat, input/output)")
    train, held_out = split_eval(examples, validation, config.seed)
    encoded = [encode_row(base, e, config.template, config.max_length) for e in train]
    # float32, whatever the model's dtype
    trainable = device.run_training_work(lambda: Trainable(base, config, train, start).to(base.device))
    optimizer = make_optimizer(trainable, config)
    # float16 gradients underflow: scale the loss up, and the gradients down before the step (a
    # step whose gradients overflowed is skipped and the scale lowered). bfloat16 needs none.
    scaler = torch.amp.GradScaler(base.device.type, enabled=base.embed_dtype == torch.float16)
    # On a GPU no micro-step may hold more than the memory plan profiled (app.engine.memory_plan).
    profiled = TRAIN_PROFILE_ROWS * TRAIN_PROFILE_TOKENS if base.device.type == "cuda" else None
    train_sizes = MicroBatches(device, config.batch_size, profiled, config.num_virtual_tokens)
    eval_sizes = MicroBatches(device, config.batch_size, profiled, config.num_virtual_tokens)

    def optimizer_step() -> None:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    total = config.total_steps(len(encoded))
    order_rng = shuffler_from(resume, config.seed)
    if resume is None:
        order: list[int] = []
        best = (float("-inf"), float("-inf"))  # (accuracy, -loss): higher is better
        best_prompt, best_step, best_loss, best_accuracy = device.run_training_work(lambda: trainable().detached()), 0, None, None
        evals_without_gain, first_step = 0, 1
    else:
        device.run_training_work(lambda: (trainable.load_state_dict(resume.trainable),
                                          optimizer.load_state_dict(resume.optimizer)))
        if resume.loss_scale:
            scaler.load_state_dict(resume.loss_scale)
        order, best_prompt = list(resume.order), VirtualTokens(config.method, resume.best_prompt.to(base.device))
        best_step, best_loss, best_accuracy = resume.best_step, resume.best_loss, resume.best_accuracy
        # A state saved at a pause before the first evaluation has no best result yet.
        best = (float("-inf"), float("-inf")) if best_loss is None else (best_accuracy, -best_loss)
        evals_without_gain, first_step = resume.evals_without_gain, resume.step + 1

    def state_at(step: int) -> TrainState:
        return TrainState(
            step=step, trainable={name: value.detach().cpu().clone() for name, value in trainable.state_dict().items()},
            optimizer=_snapshot(optimizer), loss_scale=scaler.state_dict(), order=list(order), shuffler=order_rng.getstate(),
            best_prompt=best_prompt.values.cpu(), best_step=best_step, best_loss=best_loss, best_accuracy=best_accuracy,
            evals_without_gain=evals_without_gain, elapsed_s=time.perf_counter() - started)

    stopped_early, step = False, first_step - 1
    saved_at = first_step - 1 if resume else None  # the step whose state is stored already
    try:
        for step in range(first_step, total + 1):
            # Before the step draws its data: the state is the last step's. Unstored, the run goes on.
            if hooks.should_pause() and (saved_at == step - 1 or
                                         hooks.on_state(device.run_training_work(partial(state_at, step - 1))) is not False):
                return TrainResult(best_prompt.to("cpu"), step - 1, best_step, best_loss, best_accuracy, len(train),
                                   len(held_out), time.perf_counter() - started, False, False, paused=True)
            if len(order) < config.batch_size:
                fresh = list(range(len(encoded)))
                order_rng.shuffle(fresh)
                order += fresh
            indices, order = order[: config.batch_size], order[config.batch_size :]
            batch = [encoded[i] for i in indices]
            targets = sum(row.targets for row in batch)
            loss_sum = 0.0
            for rows in train_sizes.split(batch):
                if hooks.should_cancel():  # the step's gradient so far is dropped with it
                    raise Cancelled
                view = training_view(base.model, wants_checkpointing(config.gradient_checkpointing, rows,
                                                                     config.num_virtual_tokens, on_gpu=profiled is not None))
                loss_sum += device.run_training_work(partial(_accumulate, base, view, trainable, rows, targets, scaler))
                train_sizes.observe()
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate_at(step, total, time.perf_counter() - started)
            device.run_training_work(optimizer_step)
            hooks.on_step(step, total, step * config.batch_size / len(encoded), loss_sum / targets)
            out_of_time = config.time_budget_s is not None and time.perf_counter() - started >= config.time_budget_s
            if step % config.eval_every == 0 or step == total or out_of_time:
                prompt = device.run_training_work(lambda: trainable().detached())
                eval_loss, accuracy = evaluate(base, prompt, held_out, config, device, eval_sizes)
                hooks.on_eval(step, eval_loss, accuracy)
                if (accuracy, -eval_loss) > best:
                    best = (accuracy, -eval_loss)
                    best_prompt, best_step, best_loss, best_accuracy = prompt, step, eval_loss, accuracy
                    evals_without_gain = 0
                    hooks.on_best(step, prompt, eval_loss, accuracy)
                else:
                    evals_without_gain += 1
                    if evals_without_gain >= config.early_stopping_patience:
                        stopped_early = True
                        break
                if step < total and not out_of_time:
                    if hooks.on_state(device.run_training_work(partial(state_at, step))) is not False:
                        saved_at = step
            if out_of_time:
                break
    except Cancelled:
        return TrainResult(best_prompt.to("cpu"), step - 1, best_step, best_loss, best_accuracy, len(train),
                           len(held_out), time.perf_counter() - started, False, True)
    return TrainResult(best_prompt.to("cpu"), step, best_step, best_loss, best_accuracy, len(train), len(held_out),
                       time.perf_counter() - started, stopped_early, False)
