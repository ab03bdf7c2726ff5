"""A step copies between the host and the device twice at most: its inputs there in one copy,
its sampled tokens back in one (on a GPU each copy blocks; there were 7 + 4 per attention group).
Counted on the CPU path at the one place that makes them (app.engine.transfers)."""

import torch

from app.engine import transfers
from app.engine.core import EngineCore
from app.engine.requests import GenerationRequest
from app.engine.sampling import RowSampling, sample
from tests.conftest import random_prefix_kv, random_soft_prompt
from tests.engine.test_generation import SST2_PROMPTS


def test_every_step_copies_once_each_way_whatever_its_rows(tiny_base, monkeypatch):
    copies = []
    to_device, to_host = transfers.to_device, transfers.to_host
    monkeypatch.setattr(transfers, "to_device", lambda *args: copies.append("to device") or to_device(*args))
    monkeypatch.setattr(transfers, "to_host", lambda *args: copies.append("to host") or to_host(*args))
    core = EngineCore(tiny_base, kv_tokens=4096, max_rows=8, max_step_tokens=48)
    ids = [tiny_base.tokenizer(p).input_ids for p in SST2_PROMPTS]
    kinds = [None, random_soft_prompt(tiny_base, 5, seed=1), random_prefix_kv(tiny_base, 3, seed=2)]
    sampling = [{}, {"temperature": 0.8, "seed": 1}, {"temperature": 1.2, "top_p": 0.5, "seed": 2}]
    steps = []
    with torch.inference_mode():
        for i in range(6):  # rows of every kind and sampling join while others decode, prompts in chunks
            core.add(GenerationRequest(ids[i], kinds[i % 3], 12, **sampling[i % 3]))
            steps.append(_step(core, copies))
        while core.has_work():
            steps.append(_step(core, copies))
    assert steps and all(step == ["to device", "to host"] or step == ["to device"] for step in steps), steps
    assert core.steps > 12 and core.prefix.stats()["hits"] > 0


def _step(core: EngineCore, copies: list) -> list:
    copies.clear()
    core.step()
    return list(copies)


def test_top_p_rows_draw_in_a_batch_what_each_draws_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 3000) * 3

    def row(top_p, seed):
        return RowSampling.create(1.0, top_p, seed, torch.device("cpu"))

    alone = [sample(logits[i : i + 1], [row(p, i)])[0][0] for i, p in enumerate([0.3, 0.9, 0.05, 1.0])]
    together, usable = sample(logits, [row(p, i) for i, p in enumerate([0.3, 0.9, 0.05, 1.0])])
    assert together == alone and usable == [True] * 4
    assert sample(logits[2:3], [row(1e-9, 2)])[0] == [int(logits[2].argmax())]  # the least mass: the likeliest token
