"""The engine's float32 kernels for CPU inference (float_avx2.c): an RMS norm and rotary position
embedding in one pass each, gelu(gate) * up in one pass, and decoding rows' attention read in place
from the paged KV cache.

torch runs an RMS norm on the CPU as five ops (square, mean, add, rsqrt, two products), each a pass
over the activations; the kernel reads a row once and rounds every step as they do, the sum of
squares in their order, so it gives their bits. Rotary embedding is five ops too (two products,
a negation, a concatenation, a sum), which the kernel rounds the same way in one. torch's
tanh-approximated GELU is several times slower on the CPU than its tanh, and the multiplication is
another pass over memory. Decoding rows' attention through torch means gathering every row's keys
and values into new tensors per layer, then reading them again (figures: bench/README.md). Only
inference takes these kernels: a tensor that needs gradients (training) keeps torch's ops, which
autograd can differentiate.
"""

import ctypes
import functools

import torch

from app.engine.c_kernels import Kernel, library

# -ffp-contract=off: a product and a sum written apart stay two roundings, as torch's ops round them
FLOAT = Kernel("float_avx2", ("-mavx2", "-mfma", "-ffp-contract=off"), torch.cpu._is_avx2_supported,
               "RMS norms, GELU and decoding attention go through torch's ops")


@functools.cache
def _library() -> ctypes.CDLL | None:
    built = library(FLOAT)
    if built is not None:
        pointer, count = ctypes.c_void_p, ctypes.c_int64
        built.rms_norm.argtypes = [pointer, count, count, pointer, ctypes.c_float, pointer, count, count, count, count,
                                   count, ctypes.c_int]
        built.rotary.argtypes = [pointer, count, count, pointer, pointer, count, pointer, count, count, count, count,
                                 count, ctypes.c_int]
        built.gelu_tanh_mul.argtypes = [pointer, count, pointer, count, pointer, count, count, ctypes.c_int]
        built.decode_attention.argtypes = [pointer, count, count, pointer, pointer, pointer, pointer, pointer, pointer,
                                           count, count, count, count, count, ctypes.c_float, ctypes.c_int]
        built.decode_attention.restype = ctypes.c_int
    return built


def available() -> bool:
    return _library() is not None


def takes(x: torch.Tensor) -> bool:
    """Whether these kernels compute on `x`: float32 on the CPU, in inference, and built here."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()) \
        and available()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, width] with contiguous rows, a view where its strides allow (a slice of a
    wider product's columns is one), else a copy."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * scale over x's last dimension (scale: float32 [width]), in x's
    layout where x is dense (as torch's elementwise ops keep it): `F.rms_norm`'s own bits with this
    torch (app.engine.fused_norms checks them at load)."""
    library = _library()
    assert library is not None and takes(x) and scale.dtype == torch.float32 and scale.shape == x.shape[-1:]
    grid = _row_grid(x)
    if grid is None:
        x = x.contiguous()
        grid = _row_grid(x)
        assert grid is not None
    outer, x_outer, inner, x_inner = grid
    out, (out_outer, out_inner) = torch.empty_like(x), (x_outer, x_inner)  # x's strides where x is dense
    if out.stride() != x.stride():  # x has gaps: a contiguous out, its rows in x's order
        out, (out_outer, out_inner) = torch.empty(x.shape), (inner * x.shape[-1], x.shape[-1])
    if out.numel():
        library.rms_norm(x.data_ptr(), x_outer, x_inner, scale.contiguous().data_ptr(), eps, out.data_ptr(), out_outer,
                         out_inner, outer, inner, x.shape[-1], torch.get_num_threads())
    return out


def rotates(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rotary() computes x ([1, heads, T, dim], dim contiguous and even) with cos and sin
    ([1, T, dim], dim contiguous, the same strides)."""
    return takes(x) and x.dim() == 4 and x.shape[0] == 1 and x.stride(-1) == 1 and x.shape[-1] % 2 == 0 \
        and cos.dtype == sin.dtype == torch.float32 and cos.device.type == sin.device.type == "cpu" \
        and cos.shape == sin.shape == (1, *x.shape[2:]) and cos.stride() == sin.stride() and cos.stride(-1) == 1


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (cos and sin broadcast over heads), in x's layout where x is
    dense: transformers' apply_rotary_pos_emb for one tensor, with its bits."""
    library = _library()
    assert library is not None and rotates(x, cos, sin)
    out = torch.empty_like(x)  # x's strides where x is dense, as torch's ops keep them
    if out.numel():
        library.rotary(x.data_ptr(), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(), cos.stride(1),
                       out.data_ptr(), out.stride(1), out.stride(2), x.shape[1], x.shape[2], x.shape[3],
                       torch.get_num_threads())
    return out


def _row_grid(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """x's rows (every index but the last, contiguous, dimension's) as `outer` groups of `inner`
    rows: (outer, its stride, inner, its stride) in elements; None where two levels cannot address them."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return None
    levels: list[tuple[int, int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if levels and levels[-1][1] == size * stride:  # the dimension before steps over this one whole: merge
            levels[-1] = (levels[-1][0] * size, stride)
        else:
            levels.append((size, stride))
    if len(levels) > 2:
        return None
    (outer, outer_stride), (inner, inner_stride) = [(1, 0)] * (2 - len(levels)) + levels
    return outer, outer_stride, inner, inner_stride


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


_MAX_GROUP, _LANES = 16, 8  # float_avx2.c's limits: query heads per key/value head, dim a multiple of lanes


def attends(flat_query: torch.Tensor, cache_keys: torch.Tensor) -> bool:
    """Whether decode_attention computes this layer's decoding rows: float32 on the CPU, a
    contiguous [slots, kv_heads, dim] cache, dim a multiple of 8, at most 16 query heads per
    key/value head."""
    heads, dim = flat_query.shape[1], flat_query.shape[2]
    kv_heads = cache_keys.shape[1]
    return takes(flat_query) and cache_keys.dtype == torch.float32 and cache_keys.is_contiguous() \
        and flat_query.stride(2) == 1 and dim % _LANES == 0 and heads % kv_heads == 0 \
        and heads // kv_heads <= _MAX_GROUP


def decode_attention(flat_query: torch.Tensor, tokens: torch.Tensor, cache_keys: torch.Tensor,
                     cache_values: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor, scale: float,
                     out: torch.Tensor) -> None:
    """Attention of rows with one query each, read straight from the paged cache: row r's query
    is flat_query[tokens[r]] ([T, heads, dim], any strides with contiguous dim), its keys and
    values at cache slots slots[r] ([rows, length]) under the additive mask bias[r] (0 or -inf);
    its output goes to out[tokens[r]] (out: contiguous [T, heads, dim])."""
    library = _library()
    assert library is not None and attends(flat_query, cache_keys) and cache_values.shape == cache_keys.shape
    assert cache_values.is_contiguous() and out.is_contiguous() and out.shape == flat_query.shape
    rows, length = slots.shape
    tokens, slots, bias = tokens.contiguous(), slots.contiguous(), bias.float().contiguous()
    assert tokens.dtype == slots.dtype == torch.int64 and tokens.shape == (rows,) and bias.shape == (rows, length)
    heads, dim = flat_query.shape[1], flat_query.shape[2]
    status = library.decode_attention(flat_query.data_ptr(), flat_query.stride(0), flat_query.stride(1),
                                      tokens.data_ptr(), cache_keys.data_ptr(), cache_values.data_ptr(), slots.data_ptr(),
                                      bias.data_ptr(), out.data_ptr(), rows, heads, cache_keys.shape[1], dim, length,
                                      scale, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"decode_attention's scores for {length} keys")
