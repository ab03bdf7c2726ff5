"""The exact int8 product for CPUs with AVX2 and no VNNI (int8_avx2.c), built on first use.

No library in the wheel multiplies a plain int8 weight exactly near the memory bound there: torch's
kernels are slow or (oneDNN without VNNI) saturate, and fbgemm reads only its own packed copy.
The kernel is plain C, compiled once per source and flags with the machine's C compiler (`CC`,
else `cc`) into the cache folder, and loaded with ctypes. Its OpenMP is the one torch already
loaded (the same `libgomp.so.1`), so it shares torch's threads. Where there is no compiler or
no AVX2, `available()` is False and the engine takes its fbgemm routes (app/engine/int8.py).
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("int8_avx2.c")
FLAGS = ["-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC"]
_MAX_K = (2**31 - 1) // (127 * 127)  # int32 sums of int8 products stay exact up to this K
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softserve" / "kernels"


def _build(compiler: str) -> Path:
    """The compiled library for this source and flags, built once (atomically: nodes may start together)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = CACHE_DIR / f"int8_avx2-{digest}.so"
    if not target.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        try:
            subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], check=True, capture_output=True,
                           timeout=300)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not torch.cpu._is_avx2_supported():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (cc): the AVX2 int8 kernel is not built; int8 goes through fbgemm")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("the AVX2 int8 kernel could not be built (%s); int8 goes through fbgemm", error)
        return None
    library.int8_products.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    library.int8_products.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the kernel runs here (AVX2, and a C compiler to build it once)."""
    return _library() is not None


def int8_products(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int8 rows [M, K] times int8 weight [N, K]^T: the exact integer sums, as float32 [M, N]."""
    library = _library()
    assert library is not None, "int8_products called where available() is False"
    rows, weight = rows.contiguous(), weight.contiguous()
    assert rows.dtype == weight.dtype == torch.int8 and rows.shape[1] == weight.shape[1]
    assert rows.shape[1] <= _MAX_K, "int32 sums would overflow"
    out = torch.empty(rows.shape[0], weight.shape[0])
    if rows.shape[0]:
        status = library.int8_products(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0],
                                       weight.shape[0], rows.shape[1], weight.shape[0], torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"the AVX2 int8 kernel's buffers for {rows.shape[0]} x {rows.shape[1]} rows")
    return out
