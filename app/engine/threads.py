"""Only the engine's thread computes on several cores.

torch's OpenMP runtime (libgomp) keeps a pool of worker threads for every thread that ever ran
parallel work, and once there are more pool threads than cores it stops spinning between parallel
regions: every small op of a decode step then waits for a sleeping worker. One stray big tensor
op on the event loop's thread made every engine step markedly slower for the rest of the process's
life (figures: bench/README.md). So the engine's thread takes the cores: it keeps its own thread
count, and torch's default for threads that start computing later becomes one (no pool).
"""

import os
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def take_cores(threads: int) -> None:
    """Give the calling thread `threads` threads (OpenMP and MKL), and every thread that has
    not computed yet one."""
    torch.get_num_threads()  # torch gives a thread its default on first use: do it for this one now
    torch.set_num_threads(threads)  # this thread's own counts (and torch's default, for a moment)
    in_own_thread(torch.set_num_threads, 1)  # the default, set from another thread: this one keeps its own


def in_own_thread(work: Callable[..., T], *args, **kwargs) -> T:
    """Run `work` in a thread of its own and return its result: big tensor work done there (loading
    the model) leaves no OpenMP pool behind when the thread ends."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work(*args, **kwargs)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
