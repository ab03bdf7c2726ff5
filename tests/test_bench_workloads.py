"""The issue-24 bench workloads' own logic: the bench models' padded tokenizer, how
bench.serve_load takes vLLM's best figure and checks its targets against it, how
bench.many_adapters finds the rate that keeps the engine 70% busy, and that bench.compiled_step
compiles the engine's own arithmetic."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from app.config import Settings
from app.engine.loader import DEFAULT_MODEL_NAME, packaged_model_dir
from bench.compiled_step import batch_invariant, compile_stack
from bench.many_adapters import BUSY_PROBES, BUSY_TOLERANCE, rate_for_busy_share
from bench.models import write_tokenizer
from bench.serve_load import ratios_and_targets, vllm_best
from bench.step_profile import Sections, decode_steps, load


@pytest.mark.real_model
def test_padded_tokenizer_decodes_every_id_and_encodes_text_as_before(tmp_path):
    source = packaged_model_dir(DEFAULT_MODEL_NAME, Settings().model_cache_dir)
    original = AutoTokenizer.from_pretrained(source)
    size = len(original) + 100
    write_tokenizer(tmp_path, size, 1024, source=source / "tokenizer.json")
    padded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(padded) == size
    assert padded.decode([size - 1]) == f"<|bench_pad_{size - 1}|>"  # the model may generate any id
    text = "Review: a gorgeous, witty, seductive film\nSentiment: <|bench_pad_5|>"
    assert padded(text).input_ids[1:] == original(text).input_ids[1:]  # no text encodes to a padding id


def figures(tok_s, short_p90, ttft_p50, makespan=10.0, span=10.0):
    return {"tok_s": tok_s, "short_p90_s": short_p90, "ttft_p50_s": ttft_p50, "makespan_s": makespan,
            "arrival_span_s": span}


def test_targets_compare_with_vllms_best_figure_of_the_passes_that_kept_up():
    one = {"closed": figures(100, None, 1.0), "rate_1": figures(10, 0.5, 0.2),
           "rate_4": figures(30, 0.9, 0.4, makespan=30)}  # rate 4: fell behind
    all_cores = {"closed": figures(140, None, 0.8), "rate_1": figures(10, 0.6, 0.1),
                 "rate_4": figures(30, 0.7, 0.3, makespan=11)}
    best = vllm_best([one, all_cores], [figures(150, None, 0.9)], [1, 4])  # the dtype probe's closed counts
    assert best["closed"]["tok_s"] == 150
    assert best["rate_1"] == {"sustained": True, "tok_s": 10, "short_p90_s": 0.5, "ttft_p50_s": 0.1}
    assert best["rate_4"]["short_p90_s"] == 0.7  # only the pass that kept up
    ours = {"closed": figures(160, None, 0.5), "rate_1": figures(10, 0.45, 0.15), "rate_4": figures(30, 0.6, 0.2)}
    no_cache = {"closed": figures(150, None, 0.6), "rate_1": figures(10, 0.5, 0.3), "rate_4": figures(30, 0.6, 0.3)}
    ratios, targets = ratios_and_targets({"softserve": ours, "softserve_no_prefix_cache": no_cache}, best, [1, 4])
    assert targets["closed_tok_s_at_least_vllm_best"] == {"value": 160, "target": ">= 150", "met": True}
    assert targets["rate_1_short_p90_at_most_vllm_best"]["met"]
    assert targets["rate_1_ttft_p50_at_most_vllm_best"] == {"value": 0.15, "target": "<= 0.1", "met": False}
    assert targets["rate_4_ttft_p50_at_most_vllm_best"]["met"]
    assert "prefix_cache_ttft_p50_at_2_at_most_half_of_cache_off" not in targets  # no 2 req/s pass
    assert ratios["closed"]["vs_vllm_best_tok_s"] == round(160 / 150, 3)


def test_a_rate_vllm_never_sustains_sets_no_latency_target():
    behind = {"closed": figures(100, None, 1.0), "rate_8": figures(30, 2.0, 1.0, makespan=40)}
    best = vllm_best([behind], [], [8])
    assert best["rate_8"] == {"sustained": False, "tok_s": 30, "short_p90_s": None, "ttft_p50_s": None}
    ours = {"closed": figures(90, None, 1.0), "rate_8": figures(30, 3.0, 2.0)}
    _, targets = ratios_and_targets({"softserve": ours}, best, [8])
    assert set(targets) == {"closed_tok_s_at_least_vllm_best"} and not targets["closed_tok_s_at_least_vllm_best"]["met"]


@pytest.mark.parametrize("share_at", [
    lambda rate: 1 - math.exp(-rate / 2),  # saturating, as continuous batching's share
    lambda rate: min(1.0, 0.4 * rate),  # linear (no overlap) until full
    lambda rate: min(1.0, 0.6 * rate ** 0.25),  # flat: far from the start rate
], ids=["saturating", "linear", "flat"])
@pytest.mark.parametrize("start", [0.5, 3.0, 12.0])
def test_the_busy_search_lands_within_tolerance_on_a_probed_rate(share_at, start):
    probed = []

    def busy_share_at(rate):
        probed.append(rate)
        return share_at(rate)

    rate, probes = rate_for_busy_share(busy_share_at, start, 0.7)
    assert rate in probed and probes == [(r, share_at(r)) for r in probed]
    assert abs(share_at(rate) - 0.7) <= BUSY_TOLERANCE
    assert len(probes) <= BUSY_PROBES


def test_the_busy_search_returns_the_nearest_probe_when_the_share_never_comes_near():
    shares = iter([1.0, 0.99, 0.98, 0.97, 0.96])  # saturated whatever the rate (noise, an overloaded node)
    rate, probes = rate_for_busy_share(lambda rate: next(shares), 8.0, 0.7)
    assert len(probes) == BUSY_PROBES and rate == probes[-1][0] and probes[0][0] == 8.0


def test_a_share_that_noise_moved_against_the_rate_is_taken_as_proportional():
    shares = iter([0.83, 0.90, 0.72])  # the second probe, at a lower rate, measured busier
    rate, probes = rate_for_busy_share(lambda rate: next(shares), 4.5, 0.7)
    assert probes[1][0] == pytest.approx(4.5 * 0.7 / 0.83)
    assert probes[2][0] == pytest.approx(probes[1][0] * 0.7 / 0.90)  # not the 5th power a slope of 0.2 gives
    assert rate == probes[2][0]


def test_batch_invariance_needs_every_prompt_decoded_alike_in_every_batch():
    one_row, four_rows = [[1, 2]], [[1, 2], [3], [4], [5]]  # row i decodes prompt i % 4
    assert batch_invariant([one_row, four_rows, four_rows])
    assert not batch_invariant([one_row, [[1, 9], [3], [4], [5]]])
    assert not batch_invariant([[[1, 2], [3], [4], [5], [1, 7]]])  # row 4: prompt 0 again, decoded otherwise


@pytest.mark.real_model
def test_the_compiled_copy_routes_the_engines_very_arithmetic():
    """Run eagerly, the copy bench.compiled_step compiles (its products and attention rerouted
    through custom ops, q/k/v and gate/up sliced from one shared product) decodes the engine's
    very tokens: what the bench compares with eager is only what inductor changes."""
    engine, rerouted = load(), load()
    compile_stack(rerouted)
    expected = decode_steps(engine, 4, 12, Sections())[1]
    with torch._dynamo.config.patch(disable=True):
        assert decode_steps(rerouted, 4, 12, Sections())[1] == expected
    assert rerouted.model.config._attn_implementation != engine.model.config._attn_implementation
