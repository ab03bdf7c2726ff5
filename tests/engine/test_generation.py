"""The engine against a no-cache reference decode, alone and in mixed batches."""

import pytest

from app.engine.core import EngineFault
from app.engine.generation import generate_batch
from app.engine.reference import check_against_reference, reference_greedy_decode
from app.engine.requests import GenerationRequest
from tests.conftest import INT8_TIE_TOLERANCE, random_soft_prompt

SST2_PROMPTS = [
    "a gripping , funny and moving film",
    "the plot is a mess and the acting is worse",
    "Review: an instant classic\nSentiment:",
    "it 's a charming and often affecting journey",
    "The capital of France is",
    "def fib(n):",
    "Once upon a time",
    "bland , predictable and far too long",
    "Hello",
]


def mixed_requests(base, count: int, max_new_tokens: int) -> list[GenerationRequest]:
    """`count` requests, each with its own adapter, of different prompt and prompt-tuning lengths."""
    return [
        GenerationRequest(
            prompt_ids=base.tokenizer(SST2_PROMPTS[i % len(SST2_PROMPTS)]).input_ids,
            soft_prompt=random_soft_prompt(base, num_tokens=3 + 2 * i, seed=100 + i),
            max_new_tokens=max_new_tokens,
        )
        for i in range(count)
    ]


def test_tiny_greedy_matches_reference_token_for_token(tiny_base):
    requests = mixed_requests(tiny_base, 9, max_new_tokens=12)
    for request in requests:
        [result] = generate_batch(tiny_base, [request])
        reference = reference_greedy_decode(tiny_base, request.soft_prompt, request.prompt_ids, 12)
        assert result.token_ids == reference
        assert len(reference) > 3  # not trivially short


def test_tiny_mixed_batch_equals_alone(tiny_base):
    requests = mixed_requests(tiny_base, 9, max_new_tokens=12)
    batched = generate_batch(tiny_base, requests)
    alone = [generate_batch(tiny_base, [r])[0] for r in requests]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    # The adapters really steer the output, so a mix-up between rows would show.
    assert len({tuple(b.token_ids) for b in batched}) == len(requests)


def test_adapter_changes_output_and_none_means_base(tiny_base):
    [request] = mixed_requests(tiny_base, 1, max_new_tokens=8)
    base_request = GenerationRequest(prompt_ids=request.prompt_ids, soft_prompt=None, max_new_tokens=8)
    with_adapter, without = generate_batch(tiny_base, [request, base_request])
    assert with_adapter.token_ids != without.token_ids
    assert without.token_ids == reference_greedy_decode(tiny_base, None, request.prompt_ids, 8)


@pytest.mark.real_model
def test_real_int8_greedy_matches_reference(each_real_base):
    requests = mixed_requests(each_real_base, 8, max_new_tokens=12)
    results = generate_batch(each_real_base, requests)
    checks = [
        check_against_reference(each_real_base, r.soft_prompt, r.prompt_ids, res.token_ids, 12, INT8_TIE_TOLERANCE)
        for r, res in zip(requests, results)
    ]
    # Every row matches the reference up to its first near tie (int8 noise: a few-ulp difference
    # in attention flips an activation's int8 rounding; how often depends on the CPU's kernels, so
    # no count of exact rows is asserted). A wrong position, adapter or cache entry parts far from
    # any tie. Token-for-token equality is checked in float32 on tiny models of ten families.
    assert all(c.agrees for c in checks), checks


@pytest.mark.real_model
def test_real_int8_mixed_batch_equals_alone(each_real_base):
    """Isolation, bit for bit: int8 rounding amplifies any difference in how a row's attention
    sums, so this holds only because a row's attention never depends on its batch (core._groups)."""
    requests = mixed_requests(each_real_base, 8, max_new_tokens=12)
    batched = [r.token_ids for r in generate_batch(each_real_base, requests)]
    alone = [generate_batch(each_real_base, [r])[0].token_ids for r in requests]
    other_mix = [r.token_ids for r in generate_batch(each_real_base, requests[::-2])][::-1]
    assert batched == alone
    assert other_mix == alone[1::2]


def test_stop_string_truncates_and_reports_stop(tiny_base):
    [request] = mixed_requests(tiny_base, 1, max_new_tokens=12)
    [full] = generate_batch(tiny_base, [request])
    stop = full.text[3:5]
    assert stop.strip(), full.text
    request.stop = [stop]
    [stopped] = generate_batch(tiny_base, [request])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert full.finish_reason == "length" and len(full.token_ids) == 12


def test_eos_ends_the_row(tiny_base):
    [request] = mixed_requests(tiny_base, 1, max_new_tokens=6)
    [full] = generate_batch(tiny_base, [request])
    config = tiny_base.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = [full.token_ids[2]]  # make the third token an end-of-sequence token
    try:
        [result] = generate_batch(tiny_base, [request])
    finally:
        config.eos_token_id = saved
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[:2]  # EOS itself is not part of the output


def test_sampling_is_reproducible_with_a_seed(tiny_base):
    [request] = mixed_requests(tiny_base, 1, max_new_tokens=16)
    request.temperature = 1.5

    def sample(seed):
        request.seed = seed
        return generate_batch(tiny_base, [request])[0].token_ids

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in range(5)}) > 1


def test_tiny_top_p_keeps_only_the_top_token(tiny_base):
    [request] = mixed_requests(tiny_base, 1, max_new_tokens=10)
    [greedy] = generate_batch(tiny_base, [request])
    request.temperature, request.top_p, request.seed = 1.0, 1e-6, 3
    [sampled] = generate_batch(tiny_base, [request])
    assert sampled.token_ids == greedy.token_ids


def test_a_failed_row_is_raised_not_returned_as_a_short_result(tiny_base, monkeypatch):
    from app.engine.model_runner import ModelRunner

    def broken(self, *args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(ModelRunner, "forward", broken)
    with pytest.raises(EngineFault) as raised:
        generate_batch(tiny_base, mixed_requests(tiny_base, 2, max_new_tokens=3))
    assert str(raised.value.__cause__) == "device lost"
