"""Only the engine's thread computes on several cores.

torch's OpenMP runtime (libgomp) keeps a pool of worker threads for every thread that ever ran
parallel work, and once there are more pool threads than cores it stops spinning between parallel
regions: every small op of a decode step then waits for a sleeping worker. Measured: one stray
big tensor op on the event loop's thread made every engine step 1.6x slower (50 -> 85 ms at batch
32) for the rest of the process's life. So the engine's thread takes the cores: torch's default
for threads that start computing later becomes one thread (no pool), and only the engine's own
OpenMP thread count is raised.
"""

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded, if it is libgomp."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libgomp" in line), None)
    except OSError:
        return None
    return ctypes.CDLL(path) if path else None


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def take_cores(threads: int) -> None:
    """Give the calling thread `threads` OpenMP threads, and every thread that has not computed
    yet one."""
    gomp = _libgomp()
    if gomp is None:  # another OpenMP runtime: keep torch's single process-wide setting
        torch.set_num_threads(threads)
        return
    torch.set_num_threads(1)
    torch.get_num_threads()  # torch sets a thread's OpenMP count from its default on first use: do it now
    gomp.omp_set_num_threads(threads)


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
