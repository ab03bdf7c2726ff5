"""Choosing the next token for all rows of a step at once."""

import math

import pytest
import torch

from app.engine.sampling import RowSampling, greedy_tokens, sample

CPU = torch.device("cpu")


def row(temperature=0.0, top_p=1.0, seed=None) -> RowSampling:
    return RowSampling.create(temperature, top_p, seed, CPU)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_any_positive_temperature_is_numerically_safe(temperature):
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1.0, 1.0, 7.0, 0.0]])
    tokens, usable = sample(logits, [row(temperature, seed=1), row(temperature, top_p=0.5, seed=2)])
    assert tokens == [1, 2] and usable == [True, True]  # as cold as it gets: the argmax


def test_a_row_with_nan_logits_is_unusable_and_the_others_are_not_touched():
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    expected = logits.argmax(-1).tolist()
    tokens, usable = sample(logits, [row(), row(temperature=0.8, seed=3), row()])
    assert usable == [True, False, True]
    assert [tokens[0], tokens[2]] == [expected[0], expected[2]]


def test_a_seeded_row_draws_the_same_whatever_shares_its_step():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    [alone], _ = sample(logits[2:3], [row(1.0, seed=42)])
    mixed, _ = sample(logits, [row(), row(0.7, seed=5), row(1.0, seed=42), row(1.3, top_p=0.9, seed=6)])
    assert mixed[2] == alone


def test_draws_follow_the_softmax_at_the_given_temperature():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4 at temperature 1
    sampler = row(1.0, seed=7)
    draws = [sample(logits, [sampler])[0][0] for _ in range(2000)]
    assert 0.72 < sum(draws) / len(draws) < 0.78
    hot = row(2.0, seed=8)  # temperature 2: probabilities 1/(1+sqrt 3), sqrt 3/(1+sqrt 3) = 0.634
    draws = [sample(logits, [hot])[0][0] for _ in range(2000)]
    assert 0.60 < sum(draws) / len(draws) < 0.67


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = row(1.0, top_p=0.75, seed=9)  # keeps 0.5 and 0.3: 0.5 alone falls short of 0.75
    draws = {sample(logits, [sampler])[0][0] for _ in range(300)}
    assert draws == {0, 1}


@pytest.mark.parametrize("vocab", [262144, 49152 + 77, 100])
def test_greedy_tokens_are_argmax_exactly(vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab)
    logits[1, vocab // 3] = float("nan")  # NaN counts as the largest value, as in argmax
    logits[2, [7, vocab - 1]] = 50.0  # ties: the first index wins
    logits[3, vocab - 1] = 60.0  # the maximum in a short last slice
    logits[4] = -float("inf")
    assert torch.equal(greedy_tokens(logits, width=64), logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
