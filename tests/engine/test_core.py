"""The engine core on real (tiny) models: continuous batching, the KV budget, the adapter-keyed
prefix cache and fault isolation. Steps are counted, never timed."""

import pytest
import torch

from app.engine.core import EngineCore, EngineFault, EngineOverloaded, RequestTooLarge, RowFailed
from app.engine.events import Failed, Finished
from app.engine.generation import first_step_logits
from app.engine.kv_cache import BLOCK_SIZE
from app.engine.prefix_cache import PrefixKey
from app.engine.reference import reference_greedy_decode, row_embeddings
from app.engine.requests import GenerationRequest, SoftPrompt
from tests.conftest import random_prefix_kv, random_soft_prompt
from tests.engine.test_generation import SST2_PROMPTS


def request(base, prompt: str, soft: SoftPrompt | torch.Tensor | None, max_new_tokens: int, **kwargs):
    return GenerationRequest(base.tokenizer(prompt).input_ids, soft, max_new_tokens, **kwargs)


def reference(base, req: GenerationRequest) -> list[int]:
    return reference_greedy_decode(base, req.soft_prompt, req.prompt_ids, req.max_new_tokens)


def run_until_idle(core: EngineCore, limit: int = 2000) -> int:
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        assert steps < limit
    return steps


def make_core(base, **overrides) -> EngineCore:
    return EngineCore(base, **{"kv_tokens": 4096, "max_rows": 16, "max_step_tokens": 512} | overrides)


@pytest.fixture(params=["float kernel", "torch"])
def decode_attention(request, monkeypatch):
    """Decoding rows attend through the engine's float kernel (in place in the cache), or as
    CPUs without it and GPUs do (gathered, torch's kernel); the kernel route must be taken."""
    from app.engine import float_kernel

    if request.param == "torch":
        monkeypatch.setattr(float_kernel, "attends", lambda *args: False)
        yield
        return
    if not float_kernel.available():
        pytest.skip("the float kernel does not run here")
    calls = []
    attend = float_kernel.decode_attention
    monkeypatch.setattr(float_kernel, "decode_attention", lambda *args: calls.append(1) or attend(*args))
    yield
    assert calls, "no decoding row attended through the float kernel"


def test_a_request_arriving_mid_batch_gets_its_first_token_before_the_batch_ends(tiny_base):
    core = make_core(tiny_base)
    long_rows = [core.add(request(tiny_base, SST2_PROMPTS[i], None, 64)) for i in range(4)]
    for _ in range(10):
        core.step()
    late = core.add(request(tiny_base, SST2_PROMPTS[5], random_soft_prompt(tiny_base, 6, seed=1), 8))
    core.step()  # admitted, prefilled and sampled in the same step as the others decode
    assert len(late.result.token_ids) == 1
    assert all(len(r.result.token_ids) == 11 and r.finished_at is None for r in long_rows)


def test_a_short_request_finishes_after_its_own_steps_while_long_ones_go_on(tiny_base):
    core = make_core(tiny_base)
    long_rows = [core.add(request(tiny_base, SST2_PROMPTS[i], None, 64)) for i in range(3)]
    short = core.add(request(tiny_base, SST2_PROMPTS[4], None, 4))
    finished_after = None
    for step in range(1, 8):
        events = core.step()
        if Finished(short) in events:
            finished_after = step
    assert finished_after == 4  # one step per token: the prefill gives the first
    assert short.result.finish_reason == "length" and len(short.result.token_ids) == 4
    assert all(r.finished_at is None for r in long_rows)


@pytest.mark.parametrize("prefix_cache_tokens", [0, 4096])
def test_rows_joining_and_leaving_match_the_reference(tiny_base, prefix_cache_tokens, decode_attention):
    core = make_core(tiny_base, max_rows=4, max_step_tokens=24, prefix_cache_tokens=prefix_cache_tokens)
    adapters = [SoftPrompt(random_soft_prompt(tiny_base, 3 + 2 * i, seed=40 + i), adapter_id=f"a{i}") for i in range(3)]
    requests, rows = [], []
    for i in range(10):  # a few arrive at each step; lengths and adapters vary; at most 4 run at once
        req = request(tiny_base, SST2_PROMPTS[i % len(SST2_PROMPTS)], adapters[i % 3] if i % 4 else None, 3 + 4 * (i % 4))
        requests.append(req)
        rows.append(core.add(req))
        if i % 3 == 2:
            core.step()
    run_until_idle(core)
    for req, row in zip(requests, rows):
        assert row.result.token_ids == reference(tiny_base, req)
    reused = core.prefix.stats()["reused_tokens"]
    assert reused == 0 if prefix_cache_tokens == 0 else reused > 0
    assert core.kv.stats()["reserved_tokens"] == 0


@pytest.mark.parametrize("prefix_cache_tokens", [0, 4096])
def test_prefix_tuned_and_prompt_tuned_rows_mix_and_match_the_reference(tiny_base, prefix_cache_tokens, decode_attention):
    core = make_core(tiny_base, max_rows=4, max_step_tokens=24, prefix_cache_tokens=prefix_cache_tokens)
    adapters = [random_prefix_kv(tiny_base, 5, seed=1), SoftPrompt(random_soft_prompt(tiny_base, 4, seed=2), adapter_id="pt"),
                random_prefix_kv(tiny_base, 9, seed=3)]
    requests, rows = [], []
    for i in range(9):  # rows join while others decode, the two kinds side by side
        req = request(tiny_base, SST2_PROMPTS[i % 3], adapters[i % 3], 3 + 3 * (i % 4))
        requests.append(req)
        rows.append(core.add(req))
        if i % 2:
            core.step()
    run_until_idle(core)
    outputs = [row.result.token_ids for row in rows]
    assert outputs == [reference(tiny_base, req) for req in requests]
    assert outputs[0] != reference(tiny_base, request(tiny_base, SST2_PROMPTS[0], None, 3))  # the prefix steers
    later = [row for row, req in zip(rows, requests) if req.soft_prompt is adapters[0]][1:]
    # With the cache, a later row of a prefix adapter reads the prefix (and its prompt) from it.
    if prefix_cache_tokens:
        assert all(row.num_shared_positions >= 5 for row in later)
    else:
        assert all(row.num_shared_positions == 0 for row in later)
    assert core.kv.stats()["reserved_tokens"] == 0


def test_prompts_crossing_the_sliding_window_match_the_reference_in_chunks(tiny_base, decode_attention):
    assert tiny_base.model.config.sliding_window == 512
    words = " ".join(SST2_PROMPTS * 12)
    ids = tiny_base.tokenizer(words).input_ids[:600]
    soft = random_soft_prompt(tiny_base, 5, seed=3)
    core = make_core(tiny_base, max_step_tokens=128)  # the prompt takes five chunks
    req = GenerationRequest(ids, soft, 12)
    prefixed = GenerationRequest(ids, random_prefix_kv(tiny_base, 5, seed=3), 12)
    short = request(tiny_base, SST2_PROMPTS[0], None, 12)
    row, prefixed_row, other = core.add(req), core.add(prefixed), core.add(short)
    run_until_idle(core)
    assert row.result.token_ids == reference(tiny_base, req)
    assert prefixed_row.result.token_ids == reference(tiny_base, prefixed)
    assert other.result.token_ids == reference(tiny_base, short)
    assert row.num_steps >= 5 + 11


def test_a_llama_model_serves_a_mixed_batch_like_the_reference(tiny_llama_base, decode_attention):
    base = tiny_llama_base
    core = make_core(base)
    requests = [
        request(base, SST2_PROMPTS[i], random_soft_prompt(base, 2 + 3 * i, seed=60 + i) if i else None, 10)
        for i in range(8)
    ]
    rows = [core.add(r) for r in requests]
    run_until_idle(core)
    outputs = [row.result.token_ids for row in rows]
    assert outputs == [reference(base, r) for r in requests]
    assert len({tuple(o) for o in outputs}) == len(outputs)  # the adapters really steer it


def test_gemma2_with_capped_attention_logits_and_a_short_window_matches_the_reference(tiny_gemma2_base):
    base = tiny_gemma2_base
    assert base.model.config.attn_logit_softcapping == 0.001 and base.model.config.sliding_window == 8
    requests = [request(base, SST2_PROMPTS[i], random_soft_prompt(base, 3 + i, seed=80 + i), 10) for i in range(4)]
    served = first_step_logits(base, requests)
    with torch.inference_mode():
        for r, logits in zip(requests, served):
            expected = base.model(inputs_embeds=row_embeddings(base, r.soft_prompt, r.prompt_ids)[None]).logits[0, -1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    core = make_core(base, max_step_tokens=16)
    rows = [core.add(r) for r in requests]
    run_until_idle(core)
    assert [row.result.token_ids for row in rows] == [reference(base, r) for r in requests]


def test_rows_of_one_adapter_read_its_soft_prompt_and_shared_text_from_the_cache(tiny_base):
    core = make_core(tiny_base)
    adapter = SoftPrompt(random_soft_prompt(tiny_base, 6, seed=5), adapter_id="sst2")
    template = "Review: {}\nSentiment:"
    first = request(tiny_base, template.format("a gripping film"), adapter, 6)
    core.add(first)
    run_until_idle(core)
    template_start = tiny_base.tokenizer("Review:").input_ids  # BOS and the template's fixed start
    later = [request(tiny_base, template.format(p), adapter, 6) for p in ("dull and flat", "a fine cast")]
    rows = [core.add(r) for r in later]
    run_until_idle(core)
    for req, row in zip(later, rows):
        common = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, req.prompt_ids)) if a != b)
        assert req.prompt_ids[: len(template_start)] == template_start and common >= len(template_start)
        assert row.num_shared_positions == 6 + common  # the soft prompt and every prompt token in common
        assert row.result.token_ids == reference(tiny_base, req)
    assert core.prefix.stats()["hits"] == 2


@pytest.mark.parametrize("kind", ["soft prompt", "prefix"])
def test_an_adapter_replaced_under_the_same_id_never_reads_the_old_prefix(tiny_base, kind):
    def adapter(seed: int) -> SoftPrompt:
        if kind == "prefix":
            return SoftPrompt.prefix(random_prefix_kv(tiny_base, 6, seed=seed).prefix_kv, "same-id")
        return SoftPrompt(random_soft_prompt(tiny_base, 6, seed=seed), adapter_id="same-id")

    core = make_core(tiny_base)
    old, new = adapter(7), adapter(8)
    assert old.digest != new.digest
    core.add(request(tiny_base, SST2_PROMPTS[0], old, 5))
    run_until_idle(core)
    req = request(tiny_base, SST2_PROMPTS[0], new, 5)
    row = core.add(req)
    run_until_idle(core)
    assert row.num_shared_positions == 0
    assert row.result.token_ids == reference(tiny_base, req) != reference(tiny_base, request(tiny_base, SST2_PROMPTS[0], old, 5))


def test_dropping_an_adapter_frees_its_prefix(tiny_base):
    core = make_core(tiny_base)
    keep = SoftPrompt(random_soft_prompt(tiny_base, 4, seed=9), adapter_id="keep")
    gone = SoftPrompt(random_soft_prompt(tiny_base, 20, seed=10), adapter_id="gone")
    for soft in (keep, gone):
        core.add(request(tiny_base, SST2_PROMPTS[1], soft, 3))
    run_until_idle(core)
    held = core.kv.stats()["used_tokens"]
    assert core.prefix.stats()["entries"] == 2 and held > 0
    core.drop_adapter("gone")
    assert core.prefix.stats()["entries"] == 1
    assert core.kv.stats()["used_tokens"] < held
    core.drop_adapter("keep")
    assert core.kv.stats()["used_tokens"] == 0


def test_a_burst_of_long_requests_stays_inside_the_kv_budget_and_all_finish(tiny_base):
    core = make_core(tiny_base, kv_tokens=256, prefix_cache_tokens=0)
    requests = [request(tiny_base, SST2_PROMPTS[i % len(SST2_PROMPTS)], None, 90) for i in range(6)]
    rows = [core.add(r) for r in requests]
    most_running = 0
    while core.has_work():
        core.step()
        stats = core.kv.stats()
        assert stats["used_tokens"] + stats["reserved_tokens"] <= stats["capacity_tokens"]
        most_running = max(most_running, len(core.running))
    assert most_running == 2  # each needs ~100 positions (7 blocks): two fit in 16 blocks, the rest wait
    assert [row.result.token_ids for row in rows] == [reference(tiny_base, r) for r in requests]


def test_a_request_that_can_never_fit_is_refused_when_added(tiny_base):
    core = make_core(tiny_base, kv_tokens=64)
    with pytest.raises(RequestTooLarge, match="the cache holds 64"):
        core.add(request(tiny_base, SST2_PROMPTS[0], None, 100))
    assert not core.has_work()


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_are_unaffected(tiny_base):
    core = make_core(tiny_base)
    requests = [request(tiny_base, SST2_PROMPTS[i], random_soft_prompt(tiny_base, 3, seed=i), 12) for i in range(3)]
    rows = [core.add(r) for r in requests]
    while len(rows[1].result.token_ids) < 2:
        core.step()
    requests[1].cancelled.set()  # as a client that left does, from another thread
    events = core.step()
    assert Finished(rows[1]) in events and rows[1].result.finish_reason == "cancelled"
    assert len(rows[1].result.token_ids) == 2 and rows[1] not in core.running
    run_until_idle(core)
    assert [rows[i].result.token_ids for i in (0, 2)] == [reference(tiny_base, requests[i]) for i in (0, 2)]


def poison_row(core: EngineCore, victim) -> None:
    """Make the model's logits for `victim` NaN, as a numerical fault would."""

    def hook(rows, logits):
        for i, row in enumerate(rows):
            if row is victim:
                logits[i] = float("nan")

    core.logits_hook = hook


def test_unusable_logits_fail_that_row_alone(tiny_base):
    core = make_core(tiny_base)
    requests = [request(tiny_base, SST2_PROMPTS[i], None, 6) for i in range(3)]
    rows = [core.add(r) for r in requests]
    poison_row(core, rows[1])
    events = []
    while core.has_work():
        events += core.step()
    assert Failed(rows[1]) in events and isinstance(rows[1].error, RowFailed)
    assert [rows[i].result.token_ids for i in (0, 2)] == [reference(tiny_base, requests[i]) for i in (0, 2)]


def test_a_row_whose_sampling_raises_fails_alone_and_seeded_rows_keep_their_draws(tiny_base, monkeypatch):
    from app.engine import core as core_module

    def sample_or_raise(logits, rows):  # the row with temperature 1.5 cannot be sampled
        if any(row.temperature == 1.5 for row in rows):
            raise RuntimeError("probability tensor contains either inf or nan")
        return core_module.sample.__wrapped__(logits, rows)

    sample_or_raise.__wrapped__ = core_module.sample
    seeded = [request(tiny_base, SST2_PROMPTS[i], None, 6, temperature=0.8, seed=i) for i in range(2)]
    alone = make_core(tiny_base)
    expected = [alone.add(r) for r in seeded]
    run_until_idle(alone)
    monkeypatch.setattr(core_module, "sample", sample_or_raise)
    core = make_core(tiny_base)
    greedy = request(tiny_base, SST2_PROMPTS[2], None, 6)
    rows = [core.add(r) for r in [*seeded, greedy, request(tiny_base, SST2_PROMPTS[3], None, 6, temperature=1.5)]]
    run_until_idle(core)
    assert isinstance(rows[3].error, RowFailed) and "sampling failed" in str(rows[3].error)
    assert [r.result.token_ids for r in rows[:2]] == [r.result.token_ids for r in expected]
    assert rows[2].result.token_ids == reference(tiny_base, greedy)


def test_out_of_memory_sheds_the_newest_row_and_the_rest_go_on(tiny_base):
    core = make_core(tiny_base, prefix_cache_tokens=0)
    requests = [request(tiny_base, SST2_PROMPTS[i], None, 6) for i in range(4)]
    rows = [core.add(r) for r in requests]
    forward = core.runner.forward

    def short_of_memory(embeds, positions, step, logits_at):
        if len(logits_at) > 2:
            raise torch.OutOfMemoryError("out of memory")
        return forward(embeds, positions, step, logits_at)

    core.runner.forward = short_of_memory
    events = []
    while core.has_work():
        events += core.step()
    shed = [event.row for event in events if isinstance(event, Failed)]
    assert shed == [rows[3], rows[2]] and all(isinstance(r.error, EngineOverloaded) for r in shed)
    assert [rows[i].result.token_ids for i in (0, 1)] == [reference(tiny_base, requests[i]) for i in (0, 1)]
    assert core.rows_shed == 2 and core.kv.stats()["used_tokens"] == 0


def test_a_failing_pass_fails_its_rows_and_the_next_requests_run(tiny_base):
    core = make_core(tiny_base, prefix_cache_tokens=0)
    forward, calls = core.runner.forward, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return forward(*args)

    core.runner.forward = fails_once
    first = core.add(request(tiny_base, SST2_PROMPTS[0], None, 6))
    run_until_idle(core)
    assert isinstance(first.error, EngineFault) and str(first.error.__cause__) == "device lost"
    assert len(first.result.token_ids) == 1
    req = request(tiny_base, SST2_PROMPTS[1], None, 6)
    second = core.add(req)
    run_until_idle(core)
    assert second.result.token_ids == reference(tiny_base, req)
    assert core.kv.stats()["used_tokens"] == 0


def test_bad_requests_are_refused_alone_when_added(tiny_base):
    core = make_core(tiny_base)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        core.add(GenerationRequest([1, 99_999], None, 3))
    with pytest.raises(ValueError, match="soft prompt must be"):
        core.add(GenerationRequest([2, 5], torch.zeros(3, 7), 3))
    assert not core.has_work()


def test_blocks_are_counted_in_whole_blocks_and_all_return_to_the_pool(tiny_base):
    core = make_core(tiny_base)
    capacity = core.kv.stats()["capacity_tokens"]
    assert capacity == 4096 and capacity % BLOCK_SIZE == 0
    core.add(request(tiny_base, SST2_PROMPTS[0], random_soft_prompt(tiny_base, 3, seed=1), 20))
    core.step()
    assert core.kv.stats()["used_tokens"] % BLOCK_SIZE == 0 and core.kv.stats()["reserved_tokens"] > 0
    run_until_idle(core)
    assert core.kv.stats()["reserved_tokens"] == 0 and core.kv.stats()["used_tokens"] > 0  # the cached prefix
    core.drop_adapter("")  # the base model's prefixes
    assert core.kv.stats()["used_tokens"] == 0


def test_what_an_earlier_row_left_in_its_lane_never_reaches_the_next_one(tiny_base, decode_attention):
    core = make_core(tiny_base, max_rows=2, prefix_cache_tokens=0)
    core.add(request(tiny_base, " ".join(SST2_PROMPTS), None, 4))  # a long row fills lane 1's table
    run_until_idle(core)
    core.kv.keys.fill_(float("nan"))  # garbage everywhere but in the rows' own slots...
    core.kv.values.fill_(float("nan"))
    core.kv.keys[:, :BLOCK_SIZE] = 0  # ...and the padding block, which is never handed out
    core.kv.values[:, :BLOCK_SIZE] = 0
    short, long = request(tiny_base, SST2_PROMPTS[8], None, 6), request(tiny_base, " ".join(SST2_PROMPTS[:4]), None, 6)
    rows = [core.add(short), core.add(long)]  # the short one pads up to the long one, in the old lane
    run_until_idle(core)
    assert [r.error for r in rows] == [None, None]
    assert [r.result.token_ids for r in rows] == [reference(tiny_base, short), reference(tiny_base, long)]


def test_a_waiting_request_evicts_cached_prefixes_only_when_that_lets_it_in(tiny_base):
    core = make_core(tiny_base, kv_tokens=256, max_rows=4)
    cached = SoftPrompt(random_soft_prompt(tiny_base, 4, seed=1), adapter_id="cached")
    core.add(request(tiny_base, SST2_PROMPTS[0], cached, 2))
    run_until_idle(core)
    assert core.prefix.stats()["entries"] == 1
    big = core.add(request(tiny_base, SST2_PROMPTS[1], None, 150))  # holds 10 of the 16 blocks
    core.step()
    waiting = core.add(request(tiny_base, SST2_PROMPTS[2], None, 120))  # needs 8: evicting frees only 1
    for _ in range(5):
        core.step()
        assert waiting in core.waiting and PrefixKey("cached", cached.digest) in core.prefix
    run_until_idle(core)
    assert big.result.finish_reason == waiting.result.finish_reason == "length"


def test_attention_under_a_tight_memory_bound_gives_the_same_bits_one_row_at_a_time(tiny_base, monkeypatch):
    """Issue 22: a layer's gathered keys and values grew with rows x keys; now a bound slices the
    rows, and a row attends alone whatever the slice. (The float kernel's decoding rows gather
    nothing: here every row takes the gathered route.)"""
    from app.engine import attention, float_kernel

    monkeypatch.setattr(float_kernel, "attends", lambda *args: False)
    gathered = []
    attend = attention._attend
    monkeypatch.setattr(attention, "_attend", lambda q, k, v, *rest: gathered.append(k.shape[0]) or attend(q, k, v, *rest))
    requests = [request(tiny_base, SST2_PROMPTS[i], random_soft_prompt(tiny_base, 2 + i, seed=i), 10) for i in range(6)]

    def outputs(**bound) -> list[list[int]]:
        core = make_core(tiny_base, **bound)
        rows = [core.add(r) for r in requests]
        run_until_idle(core)
        return [row.result.token_ids for row in rows]

    roomy = outputs()
    assert max(gathered) > 1
    gathered.clear()
    assert outputs(attention_temporary_bytes=1) == roomy and set(gathered) == {1}
