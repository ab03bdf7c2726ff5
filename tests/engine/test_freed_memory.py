"""glibc's allocator as a serving node sets it (app.engine.loader.keep_freed_memory): a step's
largest buffer, its logits at MAX_BATCH_SIZE rows, is reused from the heap step after step, not
mapped and page-faulted afresh (a 64-row step of Gemma 3 270M has 67 MB of them). Measured in a
fresh interpreter each: in this one, free chunks left by earlier tests may serve a buffer whatever
the settings."""

import subprocess
import sys
from pathlib import Path

import pytest

from app import runtime
from app.config import Settings

MB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
MEASURE = """
import sys, psutil, torch
from app.engine.loader import keep_freed_memory
step_buffer_bytes, nbytes = int(sys.argv[1]), int(sys.argv[2])
keep_freed_memory(step_buffer_bytes)
process = psutil.Process()
for _ in range(2):  # the first time, the heap may grow to hold it
    buffer = torch.ones(nbytes // 4)  # every page written
    before = process.memory_info().rss
    del buffer
print(before - process.memory_info().rss)
"""


def rss_given_back_by_a_free(step_buffer_bytes: int, nbytes: int) -> int:
    """Resident bytes a touched buffer of `nbytes` gives back to the OS when freed, the second time,
    in a fresh interpreter whose allocator was set with `keep_freed_memory(step_buffer_bytes)`."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(step_buffer_bytes), str(nbytes)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("step_buffer_mb", [64, 200])
def test_a_buffer_up_to_the_step_buffer_size_stays_on_the_heap(step_buffer_mb):
    assert rss_given_back_by_a_free(step_buffer_mb * MB, step_buffer_mb * MB) < 4 * MB


def test_past_the_default_a_buffer_is_unmapped_at_its_free():
    """The reason for the setting: without it, a 64 MB buffer goes back to the OS at every free."""
    assert rss_given_back_by_a_free(0, 64 * MB) > 60 * MB


def test_a_serving_node_keeps_its_logits_at_the_batch_limit(tiny_base, monkeypatch):
    sized = []
    monkeypatch.setattr(runtime, "keep_freed_memory", sized.append)
    settings = Settings(max_batch_size=48, kv_cache_tokens=4096)
    runtime.planned_core(tiny_base, settings, serves=True, trains=True)
    assert sized == [48 * tiny_base.vocab_size * 4]  # float32 logits
    runtime.planned_core(tiny_base, settings, serves=False, trains=True)  # no logits on a node that only trains
    assert len(sized) == 1
