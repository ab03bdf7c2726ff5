"""The prompt- and prefix-tuning loop on the tiny model: loss, masking, eval, early stop, cancel."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from app.datasets import Example
from app.engine.model_view import training_view
from app.train_config import TrainConfig
from tests.conftest import random_prefix_kv
from worker.training import (
    Hooks,
    MicroBatches,
    Row,
    Trainable,
    VirtualTokens,
    encode_example,
    init_prefix,
    init_prompt,
    target_losses,
    train_adapter,
)

LABELS = ["positive", "negative"]
EXAMPLES = [Example(f"review number {i} is {'good' if i % 2 else 'bad'}", LABELS[i % 2]) for i in range(40)]


def batch_loss(base, prompt: VirtualTokens, batch) -> torch.Tensor:
    """Mean cross-entropy of the target tokens of (prompt ids, target ids) pairs, with `prompt` before every row."""
    return target_losses(base, prompt, [Row.of(p, t) for p, t in batch]).mean()


def test_loss_covers_output_tokens_only(tiny_base):
    prompt = torch.randn(4, 64) * 0.3
    pairs = [encode_example(tiny_base, e, "Review: {input}\nSentiment:", 64) for e in EXAMPLES[:3]]
    got = batch_loss(tiny_base, VirtualTokens("prompt_tuning", prompt), pairs)
    # Reference: full logits over the whole sequence, one row at a time, labels masked by hand.
    embed = tiny_base.model.get_input_embeddings()
    losses, counts = [], []
    for p, t in pairs:
        ids = torch.tensor(p + t)
        logits = tiny_base.model(inputs_embeds=torch.cat([prompt, embed(ids)])[None]).logits[0]
        labels = torch.full((4 + len(ids),), -100)
        labels[4 + len(p):] = torch.tensor(t)
        losses.append(F.cross_entropy(logits[:-1], labels[1:], reduction="sum"))
        counts.append(len(t))
    assert torch.allclose(got, sum(losses) / sum(counts), atol=1e-5)
    assert pairs[0][1][-1] == tiny_base.tokenizer.eos_token_id


def test_encode_truncates_prompt_keeping_bos_and_end(tiny_base):
    long_example = Example("word " * 200 + "final question", "positive")
    prompt, target = encode_example(tiny_base, long_example, "{input}", max_length=32)
    assert len(prompt) + len(target) == 32
    assert prompt[0] == tiny_base.tokenizer.bos_token_id
    assert tiny_base.tokenizer.decode(prompt).endswith("final question")


def test_label_init_uses_label_embeddings(tiny_base):
    config = TrainConfig(num_virtual_tokens=6, init="labels")
    prompt = init_prompt(tiny_base, config, EXAMPLES)
    ids = tiny_base.tokenizer(" ".join(LABELS), add_special_tokens=False).input_ids
    expected = tiny_base.model.get_input_embeddings()(torch.tensor((ids * 6)[:6]))
    assert torch.allclose(prompt, expected)


def test_training_lowers_eval_loss_and_keeps_the_best_prompt(tiny_base):
    evals = []
    config = TrainConfig(num_virtual_tokens=4, max_steps=30, eval_every=10, batch_size=8, template="{input} =>")
    result = train_adapter(tiny_base, config, EXAMPLES, EXAMPLES[:8], Hooks(on_eval=lambda *evaluation: evals.append(evaluation)))
    assert [s for s, _, _ in evals] == [10, 20, 30]
    assert evals[-1][1] < evals[0][1]
    best = max(evals, key=lambda e: (e[2], -e[1]))
    assert (result.best_step, result.eval_loss) == (best[0], best[1])
    assert result.learned.peft_tensor().shape == (4, 64) and not result.cancelled


def test_early_stopping_after_patience(tiny_base):
    config = TrainConfig(num_virtual_tokens=4, max_steps=200, eval_every=1, early_stopping_patience=2,
                         learning_rate=1e-9, template="{input} =>")  # too small to improve
    result = train_adapter(tiny_base, config, EXAMPLES, EXAMPLES[:4])
    assert result.stopped_early and result.steps == 3 and result.best_step == 1


@pytest.mark.parametrize("schedule, factors", [("linear", [1, 0.75, 0.5, 0.25]), ("constant", [1, 1, 1, 1])])
def test_each_step_uses_the_schedules_learning_rate(tiny_base, monkeypatch, schedule, factors):
    import worker.training

    used, make = [], worker.training.make_optimizer

    def recording(trainable, config):  # the job's own optimizer, noting the rate of every step
        optimizer = make(trainable, config)
        step = optimizer.step
        optimizer.step = lambda: (used.append(optimizer.param_groups[0]["lr"]), step())
        return optimizer

    monkeypatch.setattr(worker.training, "make_optimizer", recording)
    config = TrainConfig(num_virtual_tokens=4, max_steps=4, eval_every=1000, learning_rate=0.2, lr_schedule=schedule)
    train_adapter(tiny_base, config, EXAMPLES, EXAMPLES[:4])
    assert used == pytest.approx([0.2 * f for f in factors])


def test_a_time_budget_ends_the_linear_decay_when_it_ends_the_run_sooner():
    config = TrainConfig(learning_rate=1.0, lr_schedule="linear", time_budget_s=100)
    assert config.learning_rate_at(1, 1000, elapsed_s=0) == 1.0
    assert config.learning_rate_at(11, 1000, elapsed_s=50) == pytest.approx(0.5)  # time, not steps (1%)
    assert config.learning_rate_at(901, 1000, elapsed_s=50) == pytest.approx(0.1)  # steps, ending sooner
    assert config.learning_rate_at(20, 1000, elapsed_s=120) == 0.0  # past the budget: never negative


def test_cancel_stops_within_a_step(tiny_base):
    steps = []
    config = TrainConfig(num_virtual_tokens=4, max_steps=100, eval_every=1000)
    result = train_adapter(tiny_base, config, EXAMPLES, None,
                          Hooks(on_step=lambda s, *_: steps.append(s), should_cancel=lambda: len(steps) >= 3))
    assert result.cancelled and steps == [1, 2, 3]


def test_label_choice_accuracy_picks_the_likeliest_label(tiny_base):
    from worker.training import label_choice_accuracy, target_losses

    examples = EXAMPLES[:6]
    got = label_choice_accuracy(tiny_base, None, examples, "{input} =>", 64)
    # By hand: score each label by the summed loss of its tokens (EOS excluded), pick the smallest.
    correct = 0
    for e in examples:
        scores = {}
        for label in LABELS:
            p, t = encode_example(tiny_base, Example(e.input, label), "{input} =>", 64)
            scores[label] = float(target_losses(tiny_base, None, [Row.of(p, t)])[:-1].sum())
        correct += min(scores, key=scores.get) == e.output
    assert got == correct / len(examples)


def test_checkpointing_is_automatic_for_large_batches_only():
    from worker.training import wants_checkpointing

    short = [Row.of([1] * 20, [2, 3])] * 8  # 8 x (20 + 22) = 336 tokens
    long = [Row.of([1] * 100, [2, 3])] * 8  # 8 x (20 + 102) = 976 tokens
    assert not wants_checkpointing(None, short, 20)
    assert wants_checkpointing(None, long, 20)
    assert wants_checkpointing(True, short, 20) and not wants_checkpointing(False, long, 20)
    # on a GPU always, as its memory plan profiled it, unless the job says otherwise
    assert wants_checkpointing(None, short, 20, on_gpu=True) and not wants_checkpointing(False, short, 20, on_gpu=True)


def peft_style_past(base, kv: torch.Tensor) -> DynamicCache:
    """The prefix as PEFT hands it to the model: a transformers cache filled with it."""
    cache = DynamicCache(config=base.model.config)
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys.transpose(0, 1)[None], values.transpose(0, 1)[None], layer)
    return cache


def test_prefix_loss_is_the_masked_cross_entropy_with_the_prefix_as_the_past(tiny_base):
    prefix = random_prefix_kv(tiny_base, 3, seed=1).prefix_kv
    pairs = [encode_example(tiny_base, e, "Review: {input}\nSentiment:", 64) for e in EXAMPLES[:3]]
    got = batch_loss(tiny_base, VirtualTokens("prefix_tuning", prefix), pairs)
    losses, counts = [], []
    for p, t in pairs:  # each row alone, full logits, labels masked by hand
        ids = torch.tensor([p + t])
        logits = tiny_base.model(input_ids=ids, cache=peft_style_past(tiny_base, prefix),
                                 attention_mask=torch.ones(1, 3 + ids.shape[1])).logits[0]
        labels = torch.full((ids.shape[1],), -100)
        labels[len(p):] = torch.tensor(t)
        losses.append(F.cross_entropy(logits[:-1], labels[1:], reduction="sum"))
        counts.append(len(t))
    torch.testing.assert_close(got, sum(losses) / sum(counts), atol=1e-5, rtol=1e-5)


def test_prefix_label_init_is_the_models_own_keys_and_values_for_the_labels(tiny_base):
    config = TrainConfig(method="prefix_tuning", num_virtual_tokens=6, init="labels")
    prefix = init_prefix(tiny_base, config, EXAMPLES)
    ids = tiny_base.tokenizer(" ".join(LABELS), add_special_tokens=False).input_ids
    cache = tiny_base.model(input_ids=torch.tensor([(ids * 6)[:6]]), use_cache=True).past_key_values
    shape = tiny_base.kv_shape
    assert prefix.shape == (shape.layers, 2, 6, shape.kv_heads, shape.head_dim)
    for layer in range(shape.layers):
        torch.testing.assert_close(prefix[layer, 0], cache.layers[layer].keys[0].transpose(0, 1))
        torch.testing.assert_close(prefix[layer, 1], cache.layers[layer].values[0].transpose(0, 1))


def test_a_checkpointed_prefix_step_gives_the_same_loss_and_gradients(tiny_base):
    # Recomputing a layer in backward must see the same past: the prefix cache stores nothing.
    config = TrainConfig(method="prefix_tuning", prefix_projection=True, num_virtual_tokens=3)
    trainable = Trainable(tiny_base, config, EXAMPLES)
    rows = [Row.of(*encode_example(tiny_base, e, "{input} =>", 64)) for e in EXAMPLES[:4]]
    results = []
    for checkpointed in (False, True):
        loss = target_losses(tiny_base, trainable(), rows, training_view(tiny_base.model, checkpointed)).mean()
        results.append((loss, torch.autograd.grad(loss, list(trainable.parameters()))))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss)
    for a, b in zip(grads, checkpointed_grads):
        torch.testing.assert_close(b, a)
        assert a.abs().sum() > 0  # every part of the reparameterization learns


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_lowers_eval_loss_and_returns_a_peft_shaped_prefix(tiny_base, projection):
    evals = []
    config = TrainConfig(method="prefix_tuning", prefix_projection=projection, num_virtual_tokens=4, max_steps=20,
                         eval_every=10, batch_size=8, template="{input} =>")
    result = train_adapter(tiny_base, config, EXAMPLES, EXAMPLES[:8], Hooks(on_eval=lambda *evaluation: evals.append(evaluation)))
    assert evals[-1][1] < evals[0][1]
    shape = tiny_base.kv_shape
    assert result.learned.values.shape == (shape.layers, 2, 4, shape.kv_heads, shape.head_dim)
    assert result.learned.peft_tensor().shape == (4, shape.layers * 2 * shape.kv_heads * shape.head_dim)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_every_init_gives_a_prompt_of_the_methods_shape_and_the_seed_decides_it(tiny_base, method):
    shape = tiny_base.kv_shape
    expected = (5, 64) if method == "prompt_tuning" else (shape.layers, 2, 5, shape.kv_heads, shape.head_dim)
    init = init_prompt if method == "prompt_tuning" else init_prefix
    for mode in ("labels", "text", "vocab", "random"):
        config = TrainConfig(method=method, num_virtual_tokens=5, init=mode, init_text="classify it")
        prompt = init(tiny_base, config, EXAMPLES)
        assert prompt.shape == expected and torch.isfinite(prompt).all()
        torch.testing.assert_close(init(tiny_base, config, EXAMPLES), prompt)
        if mode in ("vocab", "random"):
            assert not torch.equal(init(tiny_base, TrainConfig(method=method, num_virtual_tokens=5, init=mode, seed=1),
                                        EXAMPLES), prompt)


@pytest.mark.parametrize("method, projection", [("prompt_tuning", False), ("prefix_tuning", False),
                                                ("prefix_tuning", True)])
def test_a_run_resumed_from_a_saved_state_ends_where_the_whole_run_ends(tiny_base, method, projection):
    """Issue 21: a requeued job goes on from its last evaluation, not from step 0, to the result
    the whole run gives: learned tensors, optimizer state, step, data position and best so far."""
    from worker import train_state

    config = TrainConfig(method=method, prefix_projection=projection, num_virtual_tokens=4, max_steps=7,
                         eval_every=2, batch_size=3, early_stopping_patience=10, learning_rate=0.1)
    states, steps = [], []
    whole = train_adapter(tiny_base, config, EXAMPLES, hooks=Hooks(on_state=states.append))
    assert [s.step for s in states] == [2, 4, 6]
    saved = train_state.decode(train_state.encode(states[1]))  # as stored, and read back by another node
    resumed = train_adapter(tiny_base, config, EXAMPLES, resume=saved,
                           hooks=Hooks(on_step=lambda step, total, epoch, loss: steps.append(step)))
    assert steps == [5, 6, 7]
    assert (resumed.steps, resumed.best_step, resumed.eval_accuracy) == (whole.steps, whole.best_step, whole.eval_accuracy)
    assert torch.equal(resumed.learned.values, whole.learned.values)


def test_on_a_gpu_micro_batches_are_cut_to_the_positions_the_memory_plan_profiled():
    """MicroBatches with `max_tokens` (a GPU node): rows padded to the longest, soft prompt included."""
    bounded = MicroBatches(SimpleNamespace(step_budget_s=None), 8, max_tokens=1184, virtual_tokens=20)
    short, long, huge = (Row.of(list(range(n - 1)), [1]) for n in (100, 600, 2000))  # 120, 620, 2020 positions
    assert [len(part) for part in bounded.split([short] * 8)] == [8]  # the default job's shape: one micro-batch
    assert [len(part) for part in bounded.split([short] * 3 + [long] + [short] * 4)] == [3, 1, 4]
    assert [len(part) for part in bounded.split([huge, short])] == [1, 1]  # a longer row cannot be cut: alone
    parts = bounded.split([short] * 3 + [long] * 3 + [huge])
    assert sum(parts, []) == [short] * 3 + [long] * 3 + [huge]  # every row once, in order
    unbounded = MicroBatches(SimpleNamespace(step_budget_s=None), 8)
    assert [len(part) for part in unbounded.split([long] * 8)] == [8]
