"""glibc's allocator as a serving node sets it (app.engine.loader.keep_freed_memory): a step's
largest buffer, its logits at MAX_BATCH_SIZE rows, is reused from the heap step after step, not
mapped and page-faulted afresh (a 64-row step of Gemma 3 270M has 67 MB of them)."""

import psutil
import pytest
import torch

from app import runtime
from app.config import Settings
from app.engine.loader import keep_freed_memory

MB = 1 << 20


def rss_given_back_by_a_free(nbytes: int) -> int:
    """Bytes of resident memory a touched buffer of `nbytes` gives back to the OS when freed."""
    process = psutil.Process()
    buffer = torch.ones(nbytes // 4)  # every page written
    before = process.memory_info().rss
    del buffer
    return before - process.memory_info().rss


@pytest.fixture
def default_allocator():
    yield
    keep_freed_memory()  # what every model load sets, for the tests after this one


@pytest.mark.parametrize("step_buffer_mb", [64, 200])
def test_a_buffer_up_to_the_step_buffer_size_stays_on_the_heap(default_allocator, step_buffer_mb):
    keep_freed_memory(step_buffer_mb * MB)
    rss_given_back_by_a_free(step_buffer_mb * MB)  # the heap grows to hold it once
    assert rss_given_back_by_a_free(step_buffer_mb * MB) < 4 * MB


def test_past_the_default_a_buffer_is_unmapped_at_its_free(default_allocator):
    """The reason for the setting: without it, a 64 MB buffer goes back to the OS at every free."""
    keep_freed_memory()
    rss_given_back_by_a_free(64 * MB)
    assert rss_given_back_by_a_free(64 * MB) > 60 * MB


def test_a_serving_node_keeps_its_logits_at_the_batch_limit(tiny_base, monkeypatch):
    sized = []
    monkeypatch.setattr(runtime, "keep_freed_memory", sized.append)
    settings = Settings(max_batch_size=48, kv_cache_tokens=4096)
    runtime.planned_core(tiny_base, settings, serves=True, trains=True)
    assert sized == [48 * tiny_base.vocab_size * 4]
    runtime.planned_core(tiny_base, settings, serves=False, trains=True)  # no logits on a node that only trains
    assert len(sized) == 1
