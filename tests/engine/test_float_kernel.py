"""The engine's float32 kernels (app/engine/float_avx2.c): torch's functions to float32 rounding,
every row the same bits alone and in any batch, NaN kept in its row, and only in inference."""

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
def test_rms_norm_is_torchs_to_float32_rounding(width):
    torch.manual_seed(width)
    x = torch.randn(50, width) * torch.logspace(-3, 3, 50)[:, None]
    scale = torch.randn(width)
    expected = F.rms_norm(x.double(), (width,), scale.double(), 1e-6)
    torch.testing.assert_close(float_kernel.rms_norm(x, scale, 1e-6).double(), expected, rtol=2e-6, atol=1e-7)
    assert torch.equal(float_kernel.rms_norm(torch.zeros(2, width), scale, 1e-6), torch.zeros(2, width))  # eps


@pytest.mark.parametrize("width", WIDTHS)
def test_gelu_tanh_mul_is_torchs_to_float32_rounding(width):
    torch.manual_seed(width)
    gate = torch.cat([torch.linspace(-12, 12, 999), torch.randn(1001) * 100, torch.tensor([0.0, -0.0, 1e-30])])
    gate = gate[torch.randperm(gate.numel())][: gate.numel() // width * width].view(-1, width)
    up = torch.randn(gate.shape)
    expected = F.gelu(gate.double(), approximate="tanh") * up.double()
    # torch's float32 0.5 g (1 + tanh(y)) itself loses ~1e-7 absolute where tanh(y) nears -1
    torch.testing.assert_close(float_kernel.gelu_tanh_mul(gate, up).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [5, 640])
def test_every_row_is_the_same_bits_alone_and_in_any_batch(width):
    torch.manual_seed(0)
    x, up, scale = torch.randn(300, width) * 10, torch.randn(300, width), torch.randn(width)
    norms, products = float_kernel.rms_norm(x, scale, 1e-6), float_kernel.gelu_tanh_mul(x, up)
    for rows in [*range(0, 9), 37, 299]:  # past the rows from which threads share the work
        assert torch.equal(float_kernel.rms_norm(x[-rows:] if rows else x[:0], scale, 1e-6), norms[len(x) - rows:])
        assert torch.equal(float_kernel.gelu_tanh_mul(x[:rows], up[:rows]), products[:rows])
    for row in (0, 150, 299):
        assert torch.equal(float_kernel.rms_norm(x[row], scale, 1e-6), norms[row])
        assert torch.equal(float_kernel.gelu_tanh_mul(x[row], up[row]), products[row])


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
    for got in (float_kernel.rms_norm(x, torch.ones(640), 1e-6), float_kernel.gelu_tanh_mul(x, torch.ones(3, 640))):
        assert not got[[0, 2]].isnan().any()
    assert float_kernel.rms_norm(x, torch.ones(640), 1e-6)[1].isnan().all()  # the whole row: it fails alone
    assert float_kernel.gelu_tanh_mul(x, torch.ones(3, 640))[1, 17].isnan()


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
