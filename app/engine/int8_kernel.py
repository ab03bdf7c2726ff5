"""The engine's own exact int8 products on a plain int8 weight, built on first use: one for CPUs
with AVX2 and no VNNI (int8_avx2.c), one for CPUs with AMX (int8_amx.c).

No library in the wheel multiplies a plain int8 weight exactly near the memory bound without VNNI:
torch's kernels are slow or (oneDNN without VNNI) saturate, and fbgemm reads only its own packed
copy. With AMX, oneDNN's int8 kernels repack the weight per call (torch._int_mm) or are inexact
(its packed product), and read it at about half the memory bound at few rows. Each kernel is plain C,
compiled once per source and flags with the machine's C compiler (`CC`, else `cc`) into the cache
folder, and loaded with ctypes (app.engine.c_kernels). Where there is no compiler or not the
instructions, `available(kernel)` is False and the engine takes its other routes (app/engine/int8.py).
"""

import ctypes
import functools
import logging

import torch

from app.engine.c_kernels import Kernel, library

log = logging.getLogger(__name__)
_MAX_K = (2**31 - 1) // (128 * 128)  # int32 sums of int8 products stay exact up to this K

AVX2 = Kernel("int8_avx2", ("-mavx2",), torch.cpu._is_avx2_supported, "int8 goes through fbgemm")
AMX = Kernel("int8_amx", ("-mamx-tile", "-mamx-int8", "-mavx512f"), torch.cpu._is_amx_tile_supported,
             "int8 goes through torch._int_mm and oneDNN")


@functools.cache
def _library(kernel: Kernel = AVX2) -> ctypes.CDLL | None:
    built = library(kernel)
    if built is None:
        return None
    if kernel is AMX and built.amx_request() != 0:  # Linux lends AMX's tile state only on request
        log.warning("Linux refused this process AMX's tile state; %s", kernel.otherwise)
        return None
    built.int8_products.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    built.int8_products.restype = ctypes.c_int
    if kernel is AMX:
        built.int8_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        built.int8_linear.restype = ctypes.c_int
    return built


def available(kernel: Kernel = AVX2) -> bool:
    """Whether `kernel` runs here (its instructions, and a C compiler to build it once)."""
    return _library(kernel) is not None


def int8_products(rows: torch.Tensor, weight: torch.Tensor, kernel: Kernel = AVX2) -> torch.Tensor:
    """int8 rows [M, K] times int8 weight [N, K]^T: the exact integer sums, as float32 [M, N]."""
    library = _library(kernel)
    assert library is not None, "int8_products called where available() is False"
    rows, weight = rows.contiguous(), weight.contiguous()
    assert rows.dtype == weight.dtype == torch.int8 and rows.shape[1] == weight.shape[1]
    assert rows.shape[1] <= _MAX_K, "int32 sums would overflow"
    out = torch.empty(rows.shape[0], weight.shape[0])
    if rows.shape[0]:
        status = library.int8_products(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0],
                                       weight.shape[0], rows.shape[1], weight.shape[0], torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"{kernel.name}'s buffers for {rows.shape[0]} x {rows.shape[1]} rows")
    return out


def int8_linear(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 rows [M, K] times an int8 weight [N, K] with its scales [N], in one call of the AMX
    kernel: each row quantized to int8 by its absmax, exact int32 sums, rescaled by the row's and
    the weight row's scales; the very float32 results of app.engine.int8's quantize, multiply and
    rescale, without their passes over memory and calls. [M, N]."""
    library = _library(AMX)
    assert library is not None, "int8_linear called where the AMX kernel is not available"
    rows, weight, weight_scale = rows.contiguous(), weight.contiguous(), weight_scale.contiguous()
    assert rows.dtype == weight_scale.dtype == torch.float32 and weight.dtype == torch.int8
    assert rows.shape[1] == weight.shape[1] <= _MAX_K and weight_scale.shape == weight.shape[:1]
    out = torch.empty(rows.shape[0], weight.shape[0])
    status = library.int8_linear(rows.data_ptr(), weight.data_ptr(), weight_scale.data_ptr(), out.data_ptr(),
                                 rows.shape[0], weight.shape[0], rows.shape[1], weight.shape[0], torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"int8_amx's buffers for {rows.shape[0]} x {rows.shape[1]} rows")
    return out
