"""The engine's float32 kernels (app/engine/float_avx2.c): torch's functions to float32 rounding (the
RMS norm to torch's own bits), every row the same bits alone and in any batch, NaN kept in its row,
and only in inference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.engine import float_kernel


@pytest.fixture(autouse=True)
def kernel_here():
    if not float_kernel.available():
        pytest.skip("the float kernel does not run here (no AVX2, or no C compiler)")


# Widths: under one vector, ragged ends, one and several unrolled steps, the models' own widths.
WIDTHS = [1, 5, 8, 33, 64, 256, 640, 1000]


@pytest.mark.parametrize("width", WIDTHS)
def test_gelu_tanh_mul_is_torchs_to_float32_rounding(width):
    torch.manual_seed(width)
    gate = torch.cat([torch.linspace(-12, 12, 999), torch.randn(1001) * 100, torch.tensor([0.0, -0.0, 1e-30])])
    gate = gate[torch.randperm(gate.numel())][: gate.numel() // width * width].view(-1, width)
    up = torch.randn(gate.shape)
    expected = F.gelu(gate.double(), approximate="tanh") * up.double()
    # torch's float32 0.5 g (1 + tanh(y)) itself loses ~1e-7 absolute where tanh(y) nears -1
    torch.testing.assert_close(float_kernel.gelu_tanh_mul(gate, up).double(), expected, rtol=1e-5, atol=1e-6)


# torch picks its kernels once per process, by ATEN_CPU_CAPABILITY or the CPU: each capability runs in
# a fresh interpreter. Widths: under one
# vector and between the two, ragged ends, the models' widths (SmolLM2 576, Gemma 640, Qwen 1536,
# Llama 2048), and past the cascade's first and second level carries; rows straight and transposed.
_EXACT_NORMS = """
import sys, torch, torch.nn.functional as F
from app.engine import float_kernel
assert torch.backends.cpu.get_cpu_capability() == sys.argv[1].upper()
for width in (1, 5, 8, 12, 16, 33, 64, 256, 576, 640, 1000, 1536, 2048, 8200, 16390):
    torch.manual_seed(width)
    for x in (torch.randn(64, width) * torch.rand(64, 1) * 100, torch.randn(1, 5, 3, width).transpose(1, 2)):
        scale = torch.randn(width)
        expected = F.rms_norm(x, (width,), scale, 1e-6)
        got = float_kernel.rms_norm(x, scale, 1e-6)
        assert torch.equal(got, expected), (width, (got - expected).abs().max())
"""


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_rms_norm_gives_torchs_own_bits_at_each_cpu_capability(capability):
    if capability == "avx512" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("torch cannot run its AVX-512 kernels on this CPU")
    subprocess.run([sys.executable, "-c", _EXACT_NORMS, capability], check=True,
                   env=os.environ | {"ATEN_CPU_CAPABILITY": capability}, cwd=Path(__file__).parents[2])


def test_rms_norm_spreads_inf_and_zero_as_torch_does():
    x = torch.randn(3, 640)
    x[0] = 0.0  # all eps
    x[1, :320] = 1e30  # squares past float32's range: r = 0
    scale = torch.randn(640)
    expected = F.rms_norm(x, (640,), scale, 1e-6)
    assert torch.equal(float_kernel.rms_norm(x, scale, 1e-6), expected)


def _norm_with_ones(x: torch.Tensor, _unused: torch.Tensor) -> torch.Tensor:
    return float_kernel.rms_norm(x, torch.ones(x.shape[-1]), 1e-6)


@pytest.mark.parametrize("kernel", [float_kernel.gelu_tanh_mul, _norm_with_ones], ids=["gelu_tanh_mul", "rms_norm"])
@pytest.mark.parametrize("width", [5, 640])
def test_every_row_is_the_same_bits_alone_and_in_any_batch(kernel, width):
    torch.manual_seed(0)
    x, up = torch.randn(300, width) * 10, torch.randn(300, width)
    products = kernel(x, up)
    for rows in [*range(0, 9), 37, 299]:  # past the rows from which threads share the work
        assert torch.equal(kernel(x[-rows:] if rows else x[:0], up[-rows:] if rows else up[:0]),
                           products[len(x) - rows:])
    for row in (0, 150, 299):
        assert torch.equal(kernel(x[row], up[row]), products[row])


def test_rms_norm_reads_views_in_place_and_keeps_a_dense_inputs_layout():
    torch.manual_seed(0)
    scale = torch.randn(64)
    heads = torch.randn(1, 7, 3, 64).transpose(1, 2)  # Gemma 3's q_norm input: [1, heads, T, dim] of [1, T, heads, dim]
    got = float_kernel.rms_norm(heads, scale, 1e-6)
    assert got.shape == heads.shape and got.stride() == heads.stride()  # as torch's ops keep it
    assert torch.equal(got, float_kernel.rms_norm(heads.contiguous(), scale, 1e-6))
    sliced = heads[:, 1:, 2:5]  # gaps on two levels
    assert float_kernel._row_grid(sliced) is not None and not sliced.is_contiguous()
    assert torch.equal(float_kernel.rms_norm(sliced, scale, 1e-6), got[:, 1:, 2:5])
    three_levels = torch.randn(4, 5, 6, 64)[::2, ::2, ::2]  # read through a contiguous copy
    assert float_kernel._row_grid(three_levels) is None
    assert torch.equal(float_kernel.rms_norm(three_levels, scale, 1e-6),
                       float_kernel.rms_norm(three_levels.contiguous(), scale, 1e-6))


@pytest.mark.parametrize(("heads", "tokens", "dim"), [(4, 37, 256), (1, 37, 256), (4, 1, 64), (2, 5, 20), (3, 9, 2)])
def test_rotary_gives_transformers_bits_in_the_inputs_layout(heads, tokens, dim):
    from transformers.models.llama import modeling_llama

    original = getattr(modeling_llama.apply_rotary_pos_emb, "original", modeling_llama.apply_rotary_pos_emb)
    torch.manual_seed(heads * tokens * dim)
    q = torch.randn(1, tokens, heads, dim).transpose(1, 2) * 30  # attention's [1, heads, T, dim] view
    angles = torch.rand(1, tokens, dim) * 1000
    cos, sin = angles.cos(), angles.sin()
    expected, _ = original(q, q, cos, sin)
    got = float_kernel.rotary(q, cos, sin)
    assert torch.equal(got, expected)
    assert all(a == b for a, b, size in zip(got.stride(), expected.stride(), got.shape) if size > 1)  # its layout
    assert torch.equal(float_kernel.rotary(q.contiguous(), cos, sin), expected)
    gaps = q[:, :, ::2]  # rows with gaps: a dense out
    assert torch.equal(float_kernel.rotary(gaps, cos[:, ::2], sin[:, ::2]), original(gaps, gaps, cos[:, ::2], sin[:, ::2])[0])


def test_rotary_takes_only_what_it_computes():
    q, cos = torch.randn(1, 4, 7, 64), torch.randn(1, 7, 64)
    assert float_kernel.rotates(q, cos, cos)
    assert not float_kernel.rotates(torch.randn(2, 4, 7, 64), cos, cos)  # a batch of two
    assert not float_kernel.rotates(torch.randn(1, 4, 7, 63), torch.randn(1, 7, 63), torch.randn(1, 7, 63))  # odd dim
    assert not float_kernel.rotates(q, cos[..., :32], cos[..., :32])  # partial rotary
    assert not float_kernel.rotates(q, cos.double(), cos.double())
    assert not float_kernel.rotates(q.transpose(2, 3), cos, cos)  # dim not contiguous


def test_gelu_tanh_mul_reads_column_slices_of_a_wider_product_in_place():
    torch.manual_seed(0)
    both = torch.randn(1, 7, 2 * 35)  # gate and up from one product (app.engine.int8.SharedInputProduct)
    gate, up = both[..., :35], both[..., 35:]
    assert not gate.is_contiguous()
    got = float_kernel.gelu_tanh_mul(gate, up)
    assert got.shape == (1, 7, 35) and torch.equal(got, float_kernel.gelu_tanh_mul(gate.contiguous(), up.contiguous()))
    transposed = torch.randn(35, 7).t()  # no row view: copied first, same bits
    assert torch.equal(float_kernel.gelu_tanh_mul(transposed, transposed), float_kernel.gelu_tanh_mul(
        transposed.contiguous(), transposed.contiguous()))


def test_a_nan_stays_in_its_row():
    torch.manual_seed(0)
    x = torch.randn(3, 640)
    x[1, 17] = float("nan")
    got = float_kernel.gelu_tanh_mul(x, torch.ones(3, 640))
    assert got[1, 17].isnan() and got.isnan().sum() == 1
    normed = float_kernel.rms_norm(x, torch.ones(640), 1e-6)  # a norm spreads it over its own row only
    assert normed[1].isnan().all() and not normed[[0, 2]].isnan().any()


def test_only_float32_inference_on_the_cpu_takes_the_kernels():
    x = torch.randn(2, 8, requires_grad=True)
    assert not float_kernel.takes(x)  # training: autograd needs torch's ops
    with torch.no_grad():
        assert float_kernel.takes(x)
    with torch.inference_mode():
        assert float_kernel.takes(torch.randn(2, 8))
        assert not float_kernel.takes(torch.randn(2, 8, dtype=torch.bfloat16))
        assert not float_kernel.takes(torch.randn(2, 8, dtype=torch.float64))
        assert not float_kernel.takes(torch.randn(2, 8, device="meta"))


def _decode_case(heads: int, kv_heads: int, dim: int, rows: int = 9, length: int = 70, window: int | None = 50):
    """A layer's cache with NaN wherever no row may look, rows of random lengths and slots, and the
    additive mask the engine makes (causal, window, padding: app.engine.attention.RowGroup.bias)."""
    torch.manual_seed(heads * dim)
    total = 3 * rows
    query = torch.randn(1, heads, total, dim)  # the model's [1, H, T, D]; the kernel reads it in place
    keys, values = (torch.full((rows * length + 1, kv_heads, dim), float("nan")) for _ in range(2))
    tokens = torch.randperm(total)[:rows]
    lengths = torch.randint(1, length + 1, (rows,))
    slots = torch.randperm(rows * length).view(rows, length) + 1
    positions = torch.arange(length)
    visible = (positions < lengths[:, None]) & (positions > lengths[:, None] - 1 - (window or length))
    slots[positions >= lengths[:, None]] = 0  # padding reads slot 0
    seen = slots[visible]
    keys[seen], values[seen] = torch.randn(len(seen), kv_heads, dim), torch.randn(len(seen), kv_heads, dim)
    bias = torch.zeros(rows, length).masked_fill(~visible, float("-inf"))
    return query[0].transpose(0, 1), tokens, keys, values, slots, bias, visible


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 1, 256), (32, 8, 64), (12, 2, 128), (2, 2, 8)])
@pytest.mark.parametrize("length", [64, 70])  # a bucket of keys, and a ragged one
@pytest.mark.parametrize("scale", [0.1, 50.0])  # scores far past where e^score overflows
def test_decode_attention_is_torchs_attention_and_reads_only_what_a_row_sees(heads, kv_heads, dim, length, scale):
    from app.engine.attention import _attend

    flat_query, tokens, keys, values, slots, bias, visible = _decode_case(heads, kv_heads, dim, length=length)
    assert float_kernel.attends(flat_query, keys)
    out = torch.zeros(flat_query.shape)
    float_kernel.decode_attention(flat_query, tokens, keys, values, slots, bias, scale, out)
    rows = len(tokens)
    q = flat_query[tokens].view(rows, 1, heads, dim).transpose(1, 2)
    gathered = [torch.where(visible[:, :, None, None], cache[slots], 0) for cache in (keys, values)]  # no NaN
    expected = _attend(q, *gathered, bias[:, None], scale, None).transpose(1, 2).reshape(rows, heads, dim)
    tolerance = 1e-5 if scale < 1 else 1e-3  # a score's rounding grows with its size; softmax amplifies it
    torch.testing.assert_close(out[tokens], expected, rtol=tolerance, atol=tolerance)
    others = torch.ones(len(out), dtype=torch.bool)
    others[tokens] = False
    assert not out[others].any()  # other tokens' rows untouched


def test_decode_attention_gives_each_row_the_same_bits_alone_and_a_nan_stays_in_its_row():
    flat_query, tokens, keys, values, slots, bias, _ = _decode_case(4, 1, 256, rows=40)
    flat_query = flat_query.clone()
    flat_query[tokens[3], 2, 7] = float("nan")
    together = torch.zeros(flat_query.shape)
    float_kernel.decode_attention(flat_query, tokens, keys, values, slots, bias, 0.1, together)
    for r in range(len(tokens)):
        alone = torch.zeros(flat_query.shape)
        float_kernel.decode_attention(flat_query, tokens[r : r + 1], keys, values, slots[r : r + 1], bias[r : r + 1],
                                      0.1, alone)
        torch.testing.assert_close(alone[tokens[r]], together[tokens[r]], rtol=0, atol=0, equal_nan=True)
    assert together[tokens[3], 2].isnan().all() and not together[tokens[3], [0, 1, 3]].isnan().any()
    assert not together[tokens[torch.arange(len(tokens)) != 3]].isnan().any()


def test_decode_attention_takes_only_what_it_computes():
    query = torch.randn(5, 4, 64)
    assert float_kernel.attends(query, torch.zeros(10, 1, 64))
    assert not float_kernel.attends(query, torch.zeros(10, 1, 64, dtype=torch.bfloat16))  # a bf16 cache
    assert not float_kernel.attends(torch.randn(5, 4, 60), torch.zeros(10, 1, 60))  # dim not a multiple of 8
    assert not float_kernel.attends(torch.randn(5, 32, 64), torch.zeros(10, 1, 64))  # 32 query heads to one
    assert not float_kernel.attends(query, torch.zeros(10, 2, 64)[:, :1])  # a cache view with gaps
