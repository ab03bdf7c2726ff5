"""RMS norms and gelu(gate) * up in one pass each, for float32 rows on the CPU (float_avx2.c).

torch runs an RMS norm on the CPU as pow, mean, add, rsqrt and two multiplications, a pass over
memory and a dispatch each (`F.rms_norm` included: its CPU kernel is that composite), and its
tanh-approximated GELU is several times slower than its tanh (bench/README.md). A decoder layer of
Gemma 3 runs six norms and one GELU. Only inference takes these kernels: a tensor that needs
gradients (training) keeps torch's ops, which autograd can differentiate.
"""

import ctypes
import functools

import torch

from app.engine.c_kernels import Kernel, library

FLOAT = Kernel("float_avx2", ("-mavx2", "-mfma"), torch.cpu._is_avx2_supported,
               "RMS norms and GELU go through torch's ops")


@functools.cache
def _library() -> ctypes.CDLL | None:
    built = library(FLOAT)
    if built is not None:
        built.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
        pointer, count = ctypes.c_void_p, ctypes.c_int64
        built.gelu_tanh_mul.argtypes = [pointer, count, pointer, count, pointer, count, count, ctypes.c_int]
    return built


def available() -> bool:
    return _library() is not None


def takes(x: torch.Tensor) -> bool:
    """Whether these kernels compute on `x`: float32 on the CPU, in inference, and built here."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()) \
        and available()


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dimension) + eps) * scale; scale is float32 [x.shape[-1]]."""
    library = _library()
    assert library is not None and takes(x) and scale.dtype == torch.float32 and scale.shape == x.shape[-1:]
    x, scale = x.contiguous(), scale.contiguous()
    out = torch.empty_like(x)
    if out.numel():
        library.rms_norm(x.data_ptr(), scale.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                         eps, torch.get_num_threads())
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, width] with contiguous rows, a view where its strides allow (a slice of a
    wider product's columns is one), else a copy."""
    width = x.shape[-1]
    if x.stride(-1) == 1:
        try:
            return x.view(-1, width)
        except RuntimeError:
            pass
    return x.reshape(-1, width).contiguous()


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up, elementwise."""
    library = _library()
    assert library is not None and takes(gate) and takes(up) and gate.shape == up.shape
    out = torch.empty(gate.shape)
    if not out.numel():
        return out
    gate_rows, up_rows = _rows(gate), _rows(up)
    library.gelu_tanh_mul(gate_rows.data_ptr(), gate_rows.stride(0), up_rows.data_ptr(), up_rows.stride(0),
                          out.data_ptr(), gate_rows.shape[0], gate_rows.shape[1], torch.get_num_threads())
    return out
