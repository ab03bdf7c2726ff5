"""The CPU int8 fast path: the same bits as bitsandbytes at inference, its own path for training,
and the int8 LM head, on the tiny model loaded in int8 as the server loads the real one."""

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear8bitLt

from app.engine.int8 import Int8Head, _int8_matmul, fast_int8_forward
from app.engine.loader import load_base_model
from tests.conftest import int8_as_on


@pytest.fixture(scope="module")
def int8_base(tiny_model_dir):
    return load_base_model(tiny_model_dir, Path("unused"), quantization="int8", device="cpu")


def int8_layers(base) -> list[Linear8bitLt]:
    return [m for m in base.model.modules() if isinstance(m, Linear8bitLt)]


def held_values(weight) -> torch.Tensor:
    """The int8 values a layer or the head holds, whichever form it holds them in (see product_weight)."""
    from app.engine.int8 import HeldInt8

    return weight.weight if isinstance(weight, HeldInt8) else weight


@pytest.fixture
def bitsandbytes_weights(int8_base):
    """bitsandbytes' own int8 weights, for its forward, where the fast path dropped them (AVX2)."""
    layers = [layer for layer in int8_layers(int8_base) if layer.state.CB is None]
    for layer in layers:
        layer.state.CB = held_values(layer.product_weight)
    yield
    for layer in layers:
        layer.state.CB = None


def test_every_int8_layer_and_the_head_are_on_the_fast_path(int8_base):
    layers = int8_layers(int8_base)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(layer.forward.__func__ is fast_int8_forward for layer in layers)
    assert isinstance(int8_base.model.get_output_embeddings(), Int8Head)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_the_fast_forward_computes_what_bitsandbytes_computes(int8_base, rows, bitsandbytes_weights):
    torch.manual_seed(rows)
    for layer in int8_layers(int8_base):
        x = torch.randn(1, rows, layer.in_features) * 3
        with torch.inference_mode():
            fast, slow = layer(x), Linear8bitLt.forward(layer, x)
        # the same int8 values and scales; bitsandbytes rounds its inputs to fp16 first
        assert (fast - slow).abs().max() <= 0.01 * slow.abs().max()  # a flipped rounding or two
        assert not torch.equal(fast, torch.zeros_like(fast))


def test_with_gradients_the_layer_runs_bitsandbytes_path_and_gradients_flow(int8_base, bitsandbytes_weights):
    layer = int8_layers(int8_base)[0]
    x = (torch.randn(2, layer.in_features) * 3).requires_grad_()
    layer(x).sum().backward()
    expected = x.detach().clone().requires_grad_()
    Linear8bitLt.forward(layer, expected).sum().backward()
    # The same products summed in another order where the weights are int8 (CPUs with a fast
    # torch._int_mm): equal to float32 rounding.
    assert x.grad is not None
    torch.testing.assert_close(x.grad, expected.grad)


def test_the_int8_head_is_close_to_the_float_head_and_trains_like_it():
    torch.manual_seed(0)
    weight = torch.randn(5000, 64) * 0.05
    head = Int8Head(weight)
    # int8 values (held packed, or as float32, where the int8 kernel is slow: see product_weight)
    values = held_values(head.weight)
    assert torch.equal(values.to(torch.int8).to(values.dtype), values) and head.scale.shape == (5000,)
    hidden = torch.randn(7, 64, requires_grad=True)
    exact = hidden @ weight.t()
    logits = head(hidden)
    assert logits.dtype == torch.float32
    assert (logits - exact).abs().max() < 0.02 * exact.abs().max()  # int8 rows on both sides
    assert (logits.argmax(-1) == exact.argmax(-1)).float().mean() >= 6 / 7
    grad_out = torch.randn_like(logits)
    (logits * grad_out).sum().backward()
    straight_through = grad_out @ (values.float() * head.scale.unsqueeze(-1))
    torch.testing.assert_close(hidden.grad, straight_through, atol=1e-4, rtol=1e-4)
    exact_grad = grad_out @ weight
    assert (hidden.grad - exact_grad).norm() < 0.02 * exact_grad.norm()


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_splitting_rows_never_changes_an_integer_product(rows, split, monkeypatch):
    from app.engine import int8
    from app.engine.int8 import _int_mm

    monkeypatch.setattr(int8, "one_row_products_win", lambda: split)  # whichever this CPU prefers
    torch.manual_seed(rows)
    weight = torch.randint(-127, 128, (300, 64), dtype=torch.int8)
    quantized = torch.randint(-127, 128, (rows, 64), dtype=torch.int8)
    assert torch.equal(_int_mm(quantized, weight, split_up_to=3), torch._int_mm(quantized, weight.t()))


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_the_float_path_for_cpus_without_an_int8_kernel_gives_the_same_bits(rows):
    from app.engine.int8 import _int_mm

    torch.manual_seed(rows)
    weight = torch.randint(-127, 128, (64, 2048), dtype=torch.int8)
    weight[0] = 127  # worst case: sums far past 2**24 over the whole K
    quantized = torch.randint(-127, 128, (rows, 2048), dtype=torch.int8)
    quantized[0] = 127
    expected = (quantized.double() @ weight.double().t()).to(torch.int32)  # exact (torch._int_mm is not, on AVX2)
    got = _int_mm(quantized, weight.float(), split_up_to=3)
    assert got.dtype == torch.int32 and torch.equal(got, expected)
    assert got[0, 0] == 2048 * 127 * 127  # 33,032,192: not representable in float32 as one sum


def test_the_layers_use_the_int8_weights_where_the_int8_kernel_is_fast(int8_base):
    from app.engine.int8 import (
        AmxInt8,
        HalfPackedInt8,
        PlainInt8,
        amx_products_win,
        half_packed_is_exact,
        int_mm_is_fast,
        plain_kernel_is_exact,
    )

    layers = int8_layers(int8_base)
    held = [layer.product_weight for layer in layers] + [int8_base.model.get_output_embeddings().weight]
    if amx_products_win():  # held once, plain, for the AMX kernel
        assert all(isinstance(weight, AmxInt8) and weight.weight.dtype == torch.int8 for weight in held)
    elif int_mm_is_fast():
        assert all(weight.dtype == torch.int8 for weight in held)
    elif plain_kernel_is_exact():
        assert all(isinstance(weight, PlainInt8) and weight.weight.dtype == torch.int8 for weight in held)
    elif half_packed_is_exact():  # (a layer in a shared product holds a view of the group's plain int8)
        products = [layer.shared_input.weight if layer.shared_input else layer.product_weight for layer in layers]
        assert all(isinstance(weight, HalfPackedInt8) for weight in products + held[-1:])
    else:
        assert all(weight.dtype == torch.float32 for weight in held)


def saturating_u8s8_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What oneDNN's u8 x s8 product computes without VNNI (vpmaddubsw): the rows shifted to u8,
    adjacent products added in pairs and saturated to 16 bits, then summed and shifted back."""
    shifted = rows.int() + 128
    products = shifted[:, None, :] * weight.int()[None, :, :]
    pairs = (products[..., 0::2] + products[..., 1::2]).clamp(-(2**15), 2**15 - 1)
    return (pairs.sum(-1) - 128 * weight.int().sum(-1)).float()


def test_the_exactness_check_tells_a_saturating_kernel_from_an_exact_one():
    from app.engine import int8_kernel
    from app.engine.int8 import HalfPackedInt8, SplitSignInt8, adversarial_operands, gives_exact_sums, int_mm_is_fast

    assert gives_exact_sums(lambda rows, weight: (rows.double() @ weight.double().t()).to(torch.int32))
    assert not int8_kernel.available() or gives_exact_sums(int8_kernel.int8_products)
    amx = int8_kernel.AMX
    assert not int8_kernel.available(amx) or gives_exact_sums(lambda r, w: int8_kernel.int8_products(r, w, amx))
    assert gives_exact_sums(lambda rows, weight: SplitSignInt8(weight)(rows))
    assert gives_exact_sums(lambda rows, weight: HalfPackedInt8(weight)(rows))
    assert not int_mm_is_fast() or gives_exact_sums(lambda rows, weight: torch._int_mm(rows, weight.t()))
    assert not gives_exact_sums(saturating_u8s8_product)
    rows, weight = adversarial_operands()
    assert (rows.int() @ weight.int().t()).abs().max() > 2**24  # past float32's integers as well


def test_a_faster_kernel_that_saturates_is_never_chosen(monkeypatch):
    """Finding 8: on an AVX2 EPYC oneDNN's packed product is wrong; on AVX-512 without VNNI it
    would also be faster. Made faster and wrong here, it must still be refused."""
    from app.engine import int8

    class Saturating:
        def __init__(self, weight):
            self.weight = weight

        def __call__(self, rows):
            return saturating_u8s8_product(rows, self.weight) if rows.shape[1] > 1000 else torch.zeros(1)

    monkeypatch.setattr(int8, "int_mm_is_fast", lambda: True)
    monkeypatch.setattr(int8, "PackedInt8", Saturating)  # and instant on the timed shape
    assert not int8.packed_products_win.__wrapped__()


def test_the_packed_product_is_chosen_only_where_it_gives_exact_sums():
    from app.engine.int8 import int_mm_is_fast, packed_int8_is_exact, packed_products_win

    assert not packed_products_win() or (packed_int8_is_exact() and int_mm_is_fast())


@pytest.mark.parametrize("rows", [1, 2, 5, 40])
@pytest.mark.parametrize("k", [64, 2048])
def test_where_chosen_the_packed_product_gives_torch_int_mm_sums(rows, k):
    from app.engine.int8 import PackedInt8, _int_mm, packed_products_win

    if not packed_products_win():
        pytest.skip("the packed product is not used on this CPU (slower, or inexact)")
    torch.manual_seed(rows + k)
    weight = torch.randint(-127, 128, (300, k), dtype=torch.int8)
    weight[0] = 127  # the largest sums (past 2**24 at k=2048: rounded as .float() rounds them)
    quantized = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
    quantized[0] = 127
    quantized[-1] = -127
    packed = PackedInt8(weight)
    got = packed(quantized)
    expected = torch._int_mm(quantized, weight.t()).float()
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(_int_mm(quantized, weight, split_up_to=3, packed=packed).float(), expected)
    assert torch.equal(packed(quantized[-1:]), expected[-1:])  # a row alone: the same bits


def rows_of_each_call(monkeypatch, product_type) -> list[int]:
    """A list that gets the number of rows of each call of `product_type`'s products."""
    calls: list[int] = []
    monkeypatch.setattr(product_type, "__call__",
                        lambda self, q, call=product_type.__call__: calls.append(q.shape[0]) or call(self, q))
    return calls


def assert_heads_agree(head: Int8Head, plain: Int8Head, rows: int) -> None:
    """`head` gives `plain`'s logits and input gradients, bit for bit, on `rows` random rows."""
    hidden = torch.randn(rows, 64, requires_grad=True)
    logits = head(hidden)
    assert torch.equal(logits, plain(hidden))
    grad_out = torch.randn_like(logits)
    (logits * grad_out).sum().backward()
    expected = hidden.detach().clone().requires_grad_()
    (plain(expected) * grad_out).sum().backward()
    assert torch.equal(hidden.grad, expected.grad)


@pytest.mark.parametrize("one_row_packed", [True, False])
def test_the_packed_head_gives_the_same_logits_and_gradients_as_the_plain_one(one_row_packed, monkeypatch):
    from app.engine import int8

    torch.manual_seed(0)
    weight = torch.randn(5000, 64) * 0.05
    plain = Int8Head(weight, packed=False)
    if not int8.packed_int8_is_exact():
        pytest.skip("oneDNN's packed int8 product is inexact on this CPU (no VNNI): never chosen here")
    monkeypatch.setattr(int8, "packed_products_win", lambda: True)  # packed whatever this CPU prefers
    monkeypatch.setattr(int8, "amx_products_win", lambda: False)  # (no AMX kernel, which reads the plain weight)
    monkeypatch.setattr(int8, "packed_reads_one_row_faster", lambda weight, packed: one_row_packed)
    monkeypatch.setattr(int8, "kernel_rows_for", lambda weight, product: 0)  # not the AVX2 kernel for few rows
    packed = Int8Head(weight)
    if packed.packed is None:
        pytest.skip("torch._int_mm is slow here: the head is never packed for oneDNN")
    packed_rows = rows_of_each_call(monkeypatch, int8.PackedInt8)
    for rows in (1, 2, 7):
        packed_rows.clear()
        assert_heads_agree(packed, plain, rows)
        assert packed_rows == ([rows] if rows > 1 or one_row_packed else [])  # one row: as measured at load


def test_the_head_takes_the_avx2_kernel_up_to_the_rows_where_it_measures_faster():
    from app.engine import int8

    if not int8.plain_kernel_is_exact():
        pytest.skip("the AVX2 int8 kernel does not run here (no AVX2 or no C compiler)")
    weight = torch.ones(64, 32, dtype=torch.int8)

    def slower_up_to(limit: int):  # a route that takes 2 ms for up to `limit` rows, nothing past that
        return lambda x: time.sleep(0.002) if x.shape[0] <= limit else None

    assert int8.kernel_rows_for(weight, slower_up_to(4)) == 4
    assert int8.kernel_rows_for(weight, slower_up_to(2)) == 2
    assert int8.kernel_rows_for(weight, lambda x: None) == 0


def test_the_heads_few_row_products_by_the_avx2_kernel_give_the_same_bits(monkeypatch):
    from app.engine import int8

    if not (int8.int_mm_is_fast() and int8.plain_kernel_is_exact()):
        pytest.skip("the head reads a plain int8 weight only where torch._int_mm is fast")
    torch.manual_seed(5)
    weight = torch.randn(300, 64)
    monkeypatch.setattr(int8, "amx_products_win", lambda: False)  # a plain int8 head, for torch._int_mm
    monkeypatch.setattr(int8, "kernel_rows_for", lambda weight, product: 2)
    by_kernel = Int8Head(weight)
    monkeypatch.setattr(int8, "kernel_rows_for", lambda weight, product: 0)
    plain = Int8Head(weight)
    assert by_kernel.kernel_rows == 2 and plain.kernel_weight is None
    assert by_kernel.kernel_weight.weight is by_kernel.weight  # no second copy
    kernel_rows = rows_of_each_call(monkeypatch, int8.PlainInt8)
    for rows in (1, 2, 3):
        kernel_rows.clear()
        assert_heads_agree(by_kernel, plain, rows)
        assert kernel_rows == ([rows] if rows <= 2 else [])


def packed(layer) -> bool:
    return (layer.packed_weight if layer.shared_input is None else layer.shared_input.packed) is not None


def test_the_layers_and_head_are_packed_where_packed_products_win(int8_base):
    from app.engine.int8 import amx_products_win, packed_products_win

    layers = int8_layers(int8_base)
    head = int8_base.model.get_output_embeddings()
    # (the AMX kernel reads the plain weights: nothing is packed where it wins)
    assert {packed(layer) for layer in layers} | {head.packed is not None} == {packed_products_win() and not amx_products_win()}
    # the head's one-row kernel, measured at load, is reported with the others (/health, admin)
    assert ("LM head's one-row" in int8_base.int8_kernels) == (head.one_row_like_more and not head.kernel_rows)
    assert ("rows: the AVX2 int8 kernel" in int8_base.int8_kernels) == bool(head.kernel_rows)
    if not isinstance(layers[0].product_weight, torch.Tensor):
        return  # the AVX2 path: no shared products (a second copy), see test_on_the_avx2_path_...
    # q, k, v and gate, up read the same input: one product each in both layers; o and down alone
    assert sum(layer.shared_input is not None for layer in layers) == 2 * 5
    attention = int8_base.model.model.layers[0].self_attn
    assert attention.q_proj.shared_input is attention.v_proj.shared_input is not None
    assert attention.o_proj.shared_input is None


def test_int8_packed_weights_false_keeps_one_copy(tiny_model_dir):
    base = load_base_model(tiny_model_dir, Path("unused"), quantization="int8", device="cpu", int8_packed_weights=False)
    assert not any(packed(layer) or layer.shared_input is not None for layer in int8_layers(base))
    assert base.model.get_output_embeddings().packed is None


def test_packed_and_shared_products_give_the_models_logits_bit_for_bit(int8_base, tiny_model_dir):
    plain = load_base_model(tiny_model_dir, Path("unused"), quantization="int8", device="cpu", int8_packed_weights=False)
    torch.manual_seed(2)
    ids = torch.randint(0, plain.model.config.vocab_size, (5, 9))
    with torch.inference_mode():
        for rows in (1, 2, 5):  # one row, split rows, and packed products
            assert torch.equal(int8_base.model(ids[:rows]).logits, plain.model(ids[:rows]).logits)


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_a_shared_product_gives_each_layer_its_own_output(int8_base, rows, monkeypatch):
    from app.engine import int8

    attention = int8_base.model.model.layers[1].self_attn
    mlp = int8_base.model.model.layers[1].mlp
    if attention.q_proj.shared_input is None:
        pytest.skip("no shared products on this CPU's int8 path (AVX2)")
    torch.manual_seed(rows)
    x = torch.randn(1, rows, attention.q_proj.in_features) * 3
    with torch.inference_mode():
        alone = {layer: _alone(layer, x)
                 for layer in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj)}
        products = []
        monkeypatch.setattr(int8, "_int8_matmul", lambda *args: products.append(args) or _int8_matmul(*args))
        # in the model's order, in another order with a layer asked twice, and gate and up
        for order, count in (([attention.q_proj, attention.k_proj, attention.v_proj], 1),
                             ([attention.v_proj, attention.q_proj, attention.k_proj, attention.k_proj], 2),
                             ([mlp.up_proj, mlp.gate_proj], 1)):
            products.clear()
            for layer in order:
                assert torch.equal(layer(x), alone[layer])
            assert len(products) == count  # the whole group's product once, then one for the repeat


def _alone(layer, x):
    """The layer's own product, as without a shared one."""
    shared, layer.shared_input = layer.shared_input, None
    try:
        return layer(x)
    finally:
        layer.shared_input = shared


def test_a_shared_product_never_hands_out_an_output_for_another_input(int8_base):
    import threading

    attention = int8_base.model.model.layers[0].self_attn
    if attention.q_proj.shared_input is None:
        pytest.skip("no shared products on this CPU's int8 path (AVX2)")
    torch.manual_seed(3)
    x, y = torch.randn(2, 1, 4, attention.q_proj.in_features)
    with torch.inference_mode():
        expected_x, expected_y = _alone(attention.k_proj, x), _alone(attention.k_proj, y)
        attention.q_proj(x)
        assert torch.equal(attention.k_proj(y), expected_y)  # another tensor
        attention.q_proj(x)
        seen = []
        worker = threading.Thread(target=lambda: seen.append(attention.k_proj(y)))  # another thread's call
        with torch.inference_mode():
            worker.start()
            worker.join()
        assert torch.equal(seen[0], expected_y)
        assert torch.equal(attention.k_proj(x), expected_x)


def test_a_packed_layer_gives_the_plain_layers_bits(int8_base):
    from app.engine.int8 import PackedInt8, int_mm_is_fast, packed_int8_is_exact

    layer = int8_base.model.model.layers[0].self_attn.o_proj  # a layer with a product of its own
    if not int_mm_is_fast():
        pytest.skip("torch._int_mm is slow here: the layers' weights are never packed for oneDNN")
    if not packed_int8_is_exact():
        pytest.skip("oneDNN's packed int8 product is inexact on this CPU (no VNNI): never chosen here")
    torch.manual_seed(1)
    x = torch.randn(1, 9, layer.in_features) * 3
    saved = layer.product_weight, layer.packed_weight
    try:
        # the plain int8 weight (not the AMX kernel's holder: oneDNN's route is where it cannot be built)
        layer.product_weight = held_values(layer.product_weight)
        layer.packed_weight = PackedInt8(layer.product_weight)
        with torch.inference_mode():
            packed = layer(x)
        layer.packed_weight = None
        with torch.inference_mode():
            plain = layer(x)
    finally:
        layer.product_weight, layer.packed_weight = saved
    assert torch.equal(packed, plain)


# The AVX2 path (no VNNI): int8 values packed as float16 for fbgemm (packed weights, the default),
# or int8 weights held only in fbgemm's packed int8 layout, rows split by sign (INT8_PACKED_WEIGHTS
# false). Forced here whatever this CPU is, so both are tested on every machine.


def test_the_split_sign_product_gives_exact_sums_even_where_pair_sums_saturate():
    from app.engine.int8 import SplitSignInt8, adversarial_operands, gives_exact_sums

    assert gives_exact_sums(lambda rows, weight: SplitSignInt8(weight)(rows))
    # What it asks of fbgemm is exact even with vpmaddubsw's 16-bit pair sums (no VNNI): each part
    # is in [0, 127] with zero point 0, so the saturating product of the old shifted scheme is exact.
    rows, weight = adversarial_operands()
    positive, negative = rows.clamp(min=0), rows.clamp(max=0).neg()

    def saturating_unshifted(part: torch.Tensor) -> torch.Tensor:
        products = part.int()[:, None, :] * weight.int()[None, :, :]
        return (products[..., 0::2] + products[..., 1::2]).clamp(-(2**15), 2**15 - 1).sum(-1)

    assert torch.equal(saturating_unshifted(positive) - saturating_unshifted(negative), rows.int() @ weight.int().t())


@pytest.mark.parametrize("holder", ["PlainInt8", "SplitSignInt8", "HalfPackedInt8"])
@pytest.mark.parametrize("k", [64, 640, 1100, 2048, 2600])  # folded remainders, and slices past 2**24
def test_an_avx2_product_row_is_the_same_bits_alone_and_in_any_batch(k, holder):
    from app.engine import int8, int8_kernel

    if holder == "PlainInt8" and not int8_kernel.available():
        pytest.skip("the AVX2 int8 kernel does not run here (no AVX2 or no C compiler)")
    torch.manual_seed(k)
    weight = torch.randint(-127, 128, (300, k), dtype=torch.int8)
    weight[0] = 127  # sums past 2**24 at k=2048
    product = getattr(int8, holder)(weight)
    batch = torch.randint(-127, 128, (700, k), dtype=torch.int8)
    batch[0] = 127
    exact = (batch.double() @ weight.double().t()).to(torch.int32).float()  # as the layers convert them
    # 0 rows: a step whose chunks all stop short of sampling; 100: past _SPLIT_SIGN_ROWS, the plain copy;
    # 700: past the AVX2 kernel's chunk of rows kept in L2 (K > 200). fbgemm's routes also take the
    # rows' integers as float32.
    for rows, values in itertools.product((0, 1, 2, 5, 40, 100, 700), ("int8", "float32")[: 1 if holder == "PlainInt8" else 2]):
        got = product(batch[:rows].to(getattr(torch, values)))
        assert got.dtype == torch.float32 and got.shape == (rows, 300) and torch.equal(got, exact[:rows])
    assert product.weight is weight
    if holder == "SplitSignInt8":
        # the remainder of K past fbgemm's blocks is folded (to a power of two wide), not padded to a block
        assert product.held_bytes() <= 2.1 * weight.numel() + 512 * 8


def test_many_rows_over_a_tall_weight_multiply_its_plain_int8_in_blocks_exactly():
    from app.engine.int8 import _CONVERTED_ROWS, _SPLIT_SIGN_ROWS, SplitSignInt8

    torch.manual_seed(7)
    weight = torch.randint(-127, 128, (2 * _CONVERTED_ROWS + 5, 96), dtype=torch.int8)  # three blocks, one short
    rows = torch.randint(-127, 128, (_SPLIT_SIGN_ROWS + 1, 96), dtype=torch.int8)
    exact = (rows.double() @ weight.double().t()).float()
    assert torch.equal(SplitSignInt8(weight)(rows), exact)


def amx_kernel_here() -> None:
    from app.engine import int8_kernel

    if not int8_kernel.available(int8_kernel.AMX):  # (built but inexact must fail, not skip)
        pytest.skip("the AMX int8 kernel does not run here (no AMX, no C compiler, or no tile state from Linux)")


# K: under one 64-byte step, a ragged last step, one stretch of K, two stretches (sums carried),
# and past 2**24. N = 300: a last block of weight rows short of 32.
@pytest.mark.parametrize("k", [5, 70, 640, 2048, 2600])
def test_an_amx_product_row_is_the_same_bits_alone_and_in_any_batch(k):
    from app.engine.int8 import AmxInt8

    amx_kernel_here()
    torch.manual_seed(k)
    weight = torch.randint(-128, 128, (300, k), dtype=torch.int8)  # tdpbssd is signed: -128 too
    weight[0], weight[-1] = 127, -128
    product = AmxInt8(weight, amx_from=1)  # every row count through the kernel
    batch = torch.randint(-127, 128, (700, k), dtype=torch.int8)
    batch[0] = 127
    exact = (batch.double() @ weight.double().t()).float()  # as the layers convert the int32 sums
    # 0 rows: a step whose chunks all stop short of sampling; 15-17, 31-33: tiles of 16 input rows,
    # two at a time, ragged; 40 and 700: the weight's tiles copied to lie together for many rows.
    for rows in (0, 1, 2, 15, 16, 17, 31, 32, 33, 40, 700):
        got = product(batch[:rows])  # (no rows: torch._int_mm's empty int32 sums)
        assert got.dtype == (torch.float32 if rows else torch.int32) and got.shape == (rows, 300)
        assert torch.equal(got.float(), exact[:rows])
    assert product.weight is weight and product.held_bytes() == weight.numel()  # one int8 copy


def test_amx_products_from_two_threads_at_once_are_each_exact():
    """Serving and training run products at once, each in its own thread (and OpenMP team)."""
    from concurrent.futures import ThreadPoolExecutor

    from app.engine.int8 import AmxInt8

    amx_kernel_here()
    torch.manual_seed(3)
    weight = AmxInt8(torch.randint(-127, 128, (4000, 640), dtype=torch.int8))
    batches = [torch.randint(-127, 128, (rows, 640), dtype=torch.int8) for rows in (3, 70) * 8]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(weight, batches))
    for batch, got in zip(batches, results):
        assert torch.equal(got, (batch.double() @ weight.weight.double().t()).float())


@pytest.mark.parametrize("one_row_by_amx", [True, False])
def test_the_heads_products_by_the_amx_kernel_give_the_plain_heads_bits(one_row_by_amx, monkeypatch):
    from app.engine import int8

    amx_kernel_here()
    torch.manual_seed(4)
    weight = torch.randn(5000, 64) * 0.05
    monkeypatch.setattr(int8, "amx_products_win", lambda: False)
    plain = Int8Head(weight, packed=False)
    monkeypatch.setattr(int8, "amx_products_win", lambda: True)
    monkeypatch.setattr(int8, "amx_reads_one_row_faster", lambda weight: one_row_by_amx)  # as measured at load
    by_amx = Int8Head(weight)
    assert isinstance(by_amx.weight, int8.AmxInt8) and by_amx.packed is None  # no second copy
    assert by_amx.one_row_like_more == one_row_by_amx
    by_int_mm = rows_of_each_call(monkeypatch, int8.AmxInt8)  # products of fewer rows than amx_from
    by_kernel: list[int] = []
    monkeypatch.setattr(int8.int8_kernel, "int8_linear",
                        lambda x, w, scale, linear=int8.int8_kernel.int8_linear: by_kernel.append(x.shape[0])
                        or linear(x, w, scale))
    for rows in (1, 2, 7):
        by_int_mm.clear()
        by_kernel.clear()
        assert_heads_agree(by_amx, plain, rows)
        assert (by_kernel, by_int_mm) == (([rows], []) if rows > 1 or one_row_by_amx else ([], [rows]))


@pytest.mark.parametrize(("rows", "k"), [(1, 640), (2, 5), (17, 70), (40, 2048), (300, 2600)])
def test_the_amx_kernels_int8_linear_is_the_layers_quantize_multiply_and_rescale_bit_for_bit(rows, k):
    from app.engine import int8_kernel
    from app.engine.int8 import AmxInt8, _int8_matmul

    amx_kernel_here()
    torch.manual_seed(rows)
    weight = torch.randint(-127, 128, (300, k), dtype=torch.int8)
    weight_scale = torch.rand(300) * 0.01
    for magnitude in (1e-3, 1.0, 50.0):  # scales far from 1 either way
        x = torch.randn(rows, k) * magnitude
        x[0, 0] = 4 * magnitude  # the absmax, exactly representable
        # through torch (the head's one-row route, as on a CPU without the kernel) and through int8_linear
        expected = _int8_matmul(x, AmxInt8(weight, amx_from=rows + 1), weight_scale, 3)
        assert torch.equal(int8_kernel.int8_linear(x, weight, weight_scale), expected)
        assert torch.equal(_int8_matmul(x, AmxInt8(weight), weight_scale, 3), expected)
    x = torch.randn(3, k)
    x[1, -1] = float("nan")  # a row gone bad stays bad (the engine fails it alone), its neighbours untouched
    got = int8_kernel.int8_linear(x, weight, weight_scale)
    assert got[1].isnan().all() and torch.equal(got[[0, 2]], int8_kernel.int8_linear(x[[0, 2]], weight, weight_scale))


# The AVX2 routes: (holder, int8 copies held, what /health names), by how the node loads.
AVX2_ROUTES = {"kernel": ("PlainInt8", 1, "cpu: int8 AVX2 kernel"),  # the default where it can be built
               "fbgemm-packed": ("HalfPackedInt8", 3, "cpu: fbgemm, int8 values packed as float16"),  # no C compiler
               "fbgemm-int8-only": ("SplitSignInt8", 2, "cpu: fbgemm int8, rows split by sign")}  # and INT8_PACKED_WEIGHTS=false


@pytest.fixture(scope="module", params=list(AVX2_ROUTES))
def avx2_base(request, tiny_model_dir):
    """(route, the tiny model loaded as on a CPU without a fast torch._int_mm, an AVX2 one, by the
    AVX2 int8 kernel, or through fbgemm as where it cannot be built, with packed weights or without)."""
    from app.engine import int8, int8_kernel

    route = request.param
    if route == "kernel" and not int8_kernel.available():
        pytest.skip("the AVX2 int8 kernel does not run here (no AVX2 or no C compiler)")
    with int8_as_on("avx2"), pytest.MonkeyPatch.context() as patch:
        if route != "kernel":
            patch.setattr(int8, "plain_kernel_is_exact", lambda: False)
        base = load_base_model(tiny_model_dir, Path("unused"), quantization="int8", device="cpu",
                               int8_packed_weights=route != "fbgemm-int8-only")
    return route, base


@pytest.fixture(scope="module")
def float_values_base(tiny_model_dir):
    """The tiny model with its int8 values held as float32 and multiplied in float32 (exact on
    every CPU): what the AVX2 routes must give, bit for bit."""
    from app.engine import int8

    with int8_as_on("avx2"), pytest.MonkeyPatch.context() as patch:
        for route in ("plain_kernel_is_exact", "half_packed_is_exact", "split_sign_is_exact"):
            patch.setattr(int8, route, lambda: False)
        return load_base_model(tiny_model_dir, Path("unused"), quantization="int8", device="cpu", int8_packed_weights=False)


def test_on_the_avx2_path_the_weights_stay_int8(avx2_base):
    from app.engine import int8

    route, avx2_base = avx2_base
    holder, copies, kernels = AVX2_ROUTES[route]
    holder_type = getattr(int8, holder)
    layers = int8_layers(avx2_base)
    head = avx2_base.model.get_output_embeddings()
    shared = [layer for layer in layers if layer.shared_input is not None]
    # q/k/v and gate/up share one product where weights are packed: one copy of each kind per
    # group, the layers' plain weights views of it
    assert len(shared) == (0 if route == "fbgemm-int8-only" else 5 * len(avx2_base.model.model.layers))
    for layer in shared:
        group, own = layer.shared_input.weight, layer.product_weight
        own = own.weight if route == "kernel" else own  # the kernel's layers hold their view in a PlainInt8
        assert isinstance(group, holder_type) and own.dtype == torch.int8
        assert own.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert all(isinstance(layer.product_weight, holder_type) for layer in layers if layer.shared_input is None)
    assert all(layer.state.CB is None for layer in layers)
    assert isinstance(head.weight, holder_type) and head.packed is None
    # fbgemm's routes keep the plain int8 too (for the backward, and the split route's prefill); the kernel reads only it
    holders = {id(w): w for w in [layer.shared_input.weight if layer.shared_input else layer.product_weight for layer in layers]}
    layers_held = sum(weight.held_bytes() for weight in holders.values())
    layers_int8 = sum(layer.in_features * layer.out_features for layer in layers)
    assert copies * layers_int8 <= layers_held <= (copies + 0.05) * layers_int8
    assert copies * head.weight.shape.numel() <= head.weight.held_bytes() <= (copies + 0.05) * head.weight.shape.numel()
    assert avx2_base.int8_kernels.startswith(kernels)


def test_the_avx2_path_gives_the_float_paths_logits_and_gradients_bit_for_bit(avx2_base, float_values_base):
    _, avx2_base = avx2_base
    torch.manual_seed(4)
    ids = torch.randint(0, avx2_base.model.config.vocab_size, (5, 9))
    with torch.inference_mode():
        for rows in (1, 2, 5):
            assert torch.equal(avx2_base.model(ids[:rows]).logits, float_values_base.model(ids[:rows]).logits)
    # training's backward reads the plain int8 copies
    grads = []
    for base in (avx2_base, float_values_base):
        embeds = base.model.get_input_embeddings()(ids[:2]).detach().requires_grad_()
        base.model(inputs_embeds=embeds).logits.float().square().mean().backward()
        grads.append(embeds.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


@pytest.mark.real_model
@pytest.mark.parametrize("route", list(AVX2_ROUTES))
def test_the_avx2_path_on_the_real_model_matches_the_reference_and_batches_invariantly(avx2_real_base, route):
    from app.config import Settings
    from app.engine import int8, int8_kernel
    from app.engine.generation import generate_batch
    from app.engine.reference import check_against_reference
    from tests.conftest import INT8_TIE_TOLERANCE
    from tests.engine.test_generation import mixed_requests

    if route == "kernel" and not int8_kernel.available():
        pytest.skip("the AVX2 int8 kernel does not run here (no AVX2 or no C compiler)")
    with int8_as_on("avx2"), pytest.MonkeyPatch.context() as patch:
        if route != "kernel":
            patch.setattr(int8, "plain_kernel_is_exact", lambda: False)
        # the session's AVX2 model is the route this machine takes (the kernel where it runs)
        base = avx2_real_base if avx2_real_base.int8_kernels.startswith(AVX2_ROUTES[route][2]) else load_base_model(
            None, Settings().model_cache_dir, quantization="int8", device="cpu",
            int8_packed_weights=route != "fbgemm-int8-only")
    assert base.int8_kernels.startswith(AVX2_ROUTES[route][2])
    requests = mixed_requests(base, 5, max_new_tokens=8)
    batched = generate_batch(base, requests)
    assert [r.token_ids for r in batched] == [generate_batch(base, [r])[0].token_ids for r in requests]
    checks = [check_against_reference(base, r.soft_prompt, r.prompt_ids, res.token_ids, 8, INT8_TIE_TOLERANCE)
              for r, res in zip(requests, batched)]
    assert all(c.agrees for c in checks), checks


@pytest.mark.parametrize("has_amx, already_set, expect_cap", [
    (True, None, "AVX512_CORE_FP16"), (True, "ALL", "ALL"), (False, None, None)])
def test_onednn_is_kept_off_amx_unless_the_user_chose(monkeypatch, has_amx, already_set, expect_cap):
    from app.engine import int8

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
    if already_set is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", already_set)
    int8.keep_onednn_off_amx()
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") == expect_cap


# A fresh process loads the tiny model in int8 as the server does, then runs oneDNN's packed
# product; ONEDNN_VERBOSE names the kernel each primitive ran.
_LOAD_THEN_PACKED_PRODUCT = """
import sys, torch
from pathlib import Path
from app.engine.int8 import PackedInt8
from app.engine.loader import load_base_model
base = load_base_model(Path(sys.argv[1]), Path("unused"), quantization="int8", device="cpu")
PackedInt8(torch.ones(64, 32, dtype=torch.int8))(torch.ones(4, 32, dtype=torch.int8))
print("KERNELS", base.int8_kernels)
"""


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="AMX: this CPU has none")
def test_a_node_loading_int8_on_an_amx_cpu_runs_onednn_without_amx(tiny_model_dir):
    def kernels(**env) -> tuple[list[str], str]:
        environ = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"} | {"ONEDNN_VERBOSE": "1"} | env
        out = subprocess.run([sys.executable, "-c", _LOAD_THEN_PACKED_PRODUCT, str(tiny_model_dir)], env=environ,
                             capture_output=True, text=True, check=True).stdout
        matmuls = [line.split(",")[6] for line in out.splitlines()
                   if line.startswith("onednn_verbose") and ",exec,cpu,matmul," in line]
        return matmuls, out.split("KERNELS ")[1].strip()

    capped, reported = kernels()
    assert capped and not any("amx" in name for name in capped)
    assert reported.endswith("; oneDNN up to AVX512_CORE_FP16")
    kept, reported = kernels(ONEDNN_MAX_CPU_ISA="ALL")  # the user's choice stands
    assert any("amx" in name for name in kept)
    assert reported.endswith("; oneDNN up to ALL")


def test_the_heads_one_row_routes_are_timed_from_memory_where_the_cache_could_hold_the_head(monkeypatch):
    from app.engine import int8

    swept: list[bool] = []
    timed = int8._seconds
    monkeypatch.setattr(int8, "_seconds", lambda product, repeats, before=None: swept.append(before is not None)
                        or timed(product, repeats, before))
    monkeypatch.setattr(int8, "_last_level_cache_bytes", lambda: 1 << 20)
    int8._reads_head_faster(lambda: None, lambda: None, torch.zeros(16 << 20, dtype=torch.int8), 2)  # a real head: swept
    int8._reads_head_faster(lambda: None, lambda: None, torch.zeros(1 << 20, dtype=torch.int8), 2)  # a test's tiny head
    monkeypatch.setattr(int8, "_last_level_cache_bytes", lambda: 0)  # no cache size known
    int8._reads_head_faster(lambda: None, lambda: None, torch.zeros(16 << 20, dtype=torch.int8), 2)
    assert swept == [True, True, False, False, False, False]  # both routes of a comparison alike


def test_the_last_level_cache_is_read_where_linux_reports_it():
    from app.engine import int8

    reported = Path("/sys/devices/system/cpu/cpu0/cache/index0/size").exists()
    assert (int8._last_level_cache_bytes() > 0) == reported
