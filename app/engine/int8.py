"""int8 matmuls on the CPU without bitsandbytes' per-call overhead, and an int8 LM head.

bitsandbytes' LLM.int8 on the CPU (threshold 0) quantizes each input row to int8, multiplies with
`torch._int_mm` and rescales. The arithmetic is cheap; its dispatch is not: an autograd Function,
four custom ops, fp16 casts and unfused rescaling cost more than the matmul itself.
`fast_int8_forward` does the same quantization and integer matmul in a handful of fused ops, for
serving and training alike (so a soft prompt trains on the very outputs it is served with); its
backward is the straight-through one bitsandbytes uses: gradients flow as through the dequantized
weights, here in float32 (bitsandbytes' runs in bf16, slow on CPUs without AVX-512 BF16).

The LM head (the tied 262k x 640 embedding matrix for Gemma 3) is the largest matmul per token
and is memory-bound at small batches; `Int8Head` stores it as int8 rows with one scale each
(half the bytes of bf16 to read per step) and quantizes its input per row, as every other int8
layer does. Its backward (soft-prompt training) is the straight-through one bitsandbytes uses too:
gradients flow as through the dequantized weights.

Past one row, torch._int_mm on a plain weight falls far from the memory bound. oneDNN's int8
linear on a weight packed once into its own layout (`PackedInt8`) stays near it, with the very
same integer sums. Where it measures faster, the head and the layers use it for more than one row,
at the cost of a second copy of their int8 weights (the backward, and one-row products, read the
plain one); INT8_PACKED_WEIGHTS=false keeps one. With it, projections that read the same input
also share one product (`SharedInputProduct`).

`torch._int_mm` has a native CPU kernel only with AVX-512 VNNI or AMX; elsewhere (seen: AVX2
AMD EPYCs) it is far slower than float32, or (oneDNN's AVX2 gemm) inexact. There the int8 weights
are held once, plain, and multiplied by our own AVX2 kernel (`PlainInt8`, app/engine/int8_avx2.c:
int8 widened to int16, vpmaddwd, int32 sums; faster than every fbgemm route below at every row
count measured, at 1.0x the int8 bytes). Where it cannot be built (no C compiler), fbgemm: with
packed weights (the default), the int8 values are also packed as float16 for fbgemm's
float16-weight linear (`HalfPackedInt8`: every int8 value is exact in float16, and fbgemm
multiplies and adds in float32; 3-4.2x the int8 bytes); without, the weights stay int8 only, in
fbgemm's packed layout for products of few rows and plain for many (`SplitSignInt8`, 2x):
each input row is split into its positive and negative parts, both in [0, 127], so the u8 x s8
pair sums stay below 2**15 even without VNNI. Both cut K into slices whose sums stay below
2**24. All three are exact, so the results are the very bits `_int_mm` gives (rows stay
batch-invariant: docs/engine.md, property 6). Only where none is exact are the int8 values kept
as float32 and multiplied in float32, in such slices of K (4x the weight memory).

On a CPU with AMX, oneDNN is kept to its AVX-512 kernels (`keep_onednn_off_amx`): for a few rows
its AMX int8 kernels read a weight at about half the memory bound (the head at one row: 15-18 ms
against 8.5 on a Sapphire Rapids), and its packed product there is inexact. Products of more than
one row go instead through the engine's own AMX kernel (`AmxInt8`, app/engine/int8_amx.c: the
plain int8 weight read as AMX tiles where it lies, exact int32 sums), which reads the head near the
memory bound at few rows and is 2-2.7x as fast as oneDNN's AVX-512 kernels for a prefill's rows,
with one copy of the int8 weights (no packed copy). It also quantizes the float rows and rescales
its sums itself (`int8_kernel.int8_linear`: the float32 operations of `_quantize_rows` and
`_int8_matmul`, in their order, so the same bits), sparing their passes over memory. A layer's
one-row products stay with torch._int_mm, which reads a weight in cache faster.

A kernel is chosen for speed only among those that give exact sums here (docs/engine.md,
property 9): without VNNI, oneDNN's u8 x s8 product adds pairs of products in 16 bits, which
saturate (wrong logits, silently). So each candidate is first checked against exact integer sums
on inputs built to break it (every value +-127, K = 2048: pair sums past 16 bits, whole sums past
2**24), at load, before it is timed.

Measured figures behind these choices, and how to reproduce them: bench/README.md.
"""

import functools
import itertools
import logging
import os
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Any, cast

import torch

from app.engine import int8_kernel

log = logging.getLogger(__name__)
_INV_127 = 1.0 / 127.0
_EXACT_K = 1024  # 1024 * 127 * 127 < 2**24: float32 sums of int8 products this long are exact
_FBGEMM_K = 512  # fbgemm pads K to a multiple of this (its K block on AVX2; measured: bench/README.md)
_CONVERTED_ROWS = 1 << 14  # rows of an int8 weight converted to float32 at a time (42 MB at K = 640)
_SPLIT_SIGN_ROWS = 48  # past this many rows, converting an int8 weight to float32 beats fbgemm on AVX2 (bench/README.md)


# oneDNN's highest ISA below AMX (AVX-512 with VNNI, BF16 and FP16), as ONEDNN_MAX_CPU_ISA names it.
BELOW_AMX = "AVX512_CORE_FP16"


def keep_onednn_off_amx() -> None:
    """Cap oneDNN below AMX on a CPU that has it, unless ONEDNN_MAX_CPU_ISA is set already (set it to
    ALL to keep AMX). oneDNN reads the cap once, at its first primitive: call this before any int8
    product (figures: bench/README.md)."""
    if "ONEDNN_MAX_CPU_ISA" not in os.environ and torch.cpu._is_amx_tile_supported():
        os.environ["ONEDNN_MAX_CPU_ISA"] = BELOW_AMX


def _quantize_rows(x: torch.Tensor, as_int8: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [M, K] as int8 (or those integers in x's float dtype), scaled by their absmax
    (LLM.int8's vector-wise quantization), and the scale that undoes it [M]."""
    scale = x.abs().amax(dim=1).float().mul_(_INV_127)
    values = (x / scale.unsqueeze(-1)).round_()
    return values.to(torch.int8) if as_int8 else values, scale


def _seconds(product, repeats: int, before=None) -> float:
    """The fastest of `repeats` calls of `product`, after one to warm up: the least disturbed by
    other work on the node (a load-time choice made under load once picked a far slower kernel).
    `before` runs, untimed, ahead of each timed call."""
    product()
    fastest = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        product()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def _last_level_cache_bytes() -> int:
    """The CPU's largest cache as Linux reports it, or 0 where it does not."""
    sizes = []
    for cache in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (cache / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        if size.rstrip("KMG").isdigit():
            sizes.append(int(size.rstrip("KMG")) * scale)
    return max(sizes, default=0)


def _reads_head_faster(product, other, weight: torch.Tensor, repeats: int = 5) -> bool:
    """Whether `product` beats `other` over the LM head's weight, each read as a decode step reads
    it: from memory. Between two of its reads in a step every layer's weights pass through the cache,
    but in a tight loop a cache that holds the weight serves it (a 300 MB L3 holds Gemma 3 270M's
    168 MB head: there the AMX kernel and torch._int_mm timed alike at load, while in decode steps
    the AMX kernel took 0.76x the time). So where the weight could stay in the last-level cache, a
    sweep over twice that cache comes before each timed call. Weights under 16 MB (tests' tiny
    heads) are timed as they are: what they choose costs nothing."""
    cache = _last_level_cache_bytes()
    before = None
    if weight.numel() * weight.element_size() >= 16 << 20 and cache:
        sweep = torch.zeros(2 * cache // 4, dtype=torch.int32)
        before = functools.partial(sweep.add_, 1)
    return _seconds(product, repeats, before) < _seconds(other, repeats, before)


def adversarial_operands(k: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows [8, k] and weight [64, k] of +-127 only, in fixed random signs, with all-127 and
    all-(-127) rows: the largest products, pairs of them past 16 bits, sums past 2**24."""
    generator = torch.Generator().manual_seed(0)
    rows, weight = ((torch.randint(0, 2, (n, k), generator=generator) * 2 - 1) * 127 for n in (8, 64))
    rows[0], rows[1], weight[0], weight[1] = 127, -127, 127, -127
    return rows.to(torch.int8), weight.to(torch.int8)


def gives_exact_sums(product) -> bool:
    """Whether `product(rows, weight)` -- int8 rows [M, K] times int8 weight [N, K]^T, as int32 sums
    or those sums as float32 -- gives the exact integer sums on adversarial operands."""
    rows, weight = adversarial_operands()
    exact = rows.double() @ weight.double().t()  # every sum is below 2**53: exact
    try:
        got = product(rows, weight)
    except RuntimeError:
        return False
    expected = exact.to(torch.int32) if got.dtype == torch.int32 else exact.to(torch.int32).to(got.dtype)
    return got.shape == expected.shape and torch.equal(got, expected)


@functools.cache
def int_mm_is_fast() -> bool:
    """Whether torch._int_mm gives exact sums here and beats a float32 product of the same shape
    (a decode-sized one)."""
    if not gives_exact_sums(lambda rows, weight: torch._int_mm(rows, weight.t())):
        log.warning("torch._int_mm gives inexact sums on this CPU: not used")
        return False
    a, b = torch.ones(32, 640, dtype=torch.int8), torch.ones(2048, 640, dtype=torch.int8)
    af, bf = a.float(), b.float()
    return _seconds(lambda: torch._int_mm(a, b.t()), 5) <= 2 * _seconds(lambda: af @ bf.t(), 5)


@functools.cache
def one_row_products_win() -> bool:
    """Whether two one-row torch._int_mm products beat one two-row product here (a decode-sized
    layer). Measured once at load, because the answer differs by CPU: with AVX-512 VNNI and no AMX
    they won, on a Sapphire Rapids (AMX) they lost (bench/README.md)."""
    a, w = torch.ones(2, 640, dtype=torch.int8), torch.ones(2048, 640, dtype=torch.int8)
    one_row_each = _seconds(lambda: (torch._int_mm(a[:1], w.t()), torch._int_mm(a[1:], w.t())), 20)
    return one_row_each < _seconds(lambda: torch._int_mm(a, w.t()), 20)


class SplitSignInt8:
    """An int8 weight [N, K] held only in fbgemm's packed layout. Calling it with int8 rows [M, K]
    (or their integers as float32) gives their exact products as float32: the rows' positive and negative parts, each in [0, 127],
    go through fbgemm's u8 x s8 linear as 2M rows. Adjacent u8 x s8 products then add to at most
    2 * 127 * 127 < 2**15, so the 16-bit pair sums of AVX2's vpmaddubsw never saturate; sums over
    at most _EXACT_K columns are integers below 2**24, exact in float32, and longer K adds such
    slices in int32 (the very bits torch._int_mm gives, converted as `.float()` converts them).

    fbgemm pads K to a multiple of _FBGEMM_K (1.6x the bytes for K = 640). So K is cut into
    slices of whole blocks, and the remainder r of K (if any) is folded: f = _FBGEMM_K / w
    weight rows' remainders (padded to w, the power of two at or above r), N/f rows apart, side
    by side make one row of an [N/f, _FBGEMM_K] weight, which f copies of the parts' remainders
    multiply, each copy in its own columns (a block-diagonal input of f * 2M rows). The packed
    weight stays one int8 copy; the remainder's arithmetic grows f-fold, which costs little where
    reading the weight bounds the product.

    Past _SPLIT_SIGN_ROWS rows (prefill) the doubled rows and fbgemm's per-output cost make this
    2-3x slower than float32; so the plain int8 weight is kept too, and such products convert it
    to float32 slice by slice (`_float_int_mm`: exact, the same bits), a cost spread over the
    rows; training's backward reads it too (fbgemm's unpacking takes seconds for the head)."""

    def __init__(self, weight: torch.Tensor):
        self.shape = weight.shape
        self.weight = weight
        n, k = weight.shape
        whole = k - k % _FBGEMM_K
        self.fold = _FBGEMM_K >> (k - whole - 1).bit_length() if whole < k else 1
        padded = torch.zeros(-(-n // self.fold) * self.fold, k, dtype=torch.int8)  # rows for an even fold
        padded[:n] = weight
        self.slices = [(start, min(start + _EXACT_K, whole), _fbgemm_prepack(padded[:, start : min(start + _EXACT_K, whole)]))
                       for start in range(0, whole, _EXACT_K)]
        self.rest = None
        if whole < k:
            width = _FBGEMM_K // self.fold
            rest = torch.nn.functional.pad(padded[:, whole:], (0, width - (k - whole)))
            folded = rest.view(self.fold, -1, width).transpose(0, 1).reshape(-1, _FBGEMM_K)
            self.rest = (whole, width, _fbgemm_prepack(folded))

    def __call__(self, quantized: torch.Tensor) -> torch.Tensor:
        rows, k = quantized.shape
        if rows == 0:  # a step whose chunks all end short of sampling asks the head for no rows
            return torch.zeros(0, self.shape[0])
        if rows > _SPLIT_SIGN_ROWS:
            return _float_int_mm(quantized, self.weight).float()
        parts = torch.cat([quantized, quantized.neg()]).clamp_(min=0).float()  # float input: no conversion
        sums = [_fbgemm_product(parts[:, start:end], packed) for start, end, packed in self.slices]
        if self.rest is not None:
            whole, width, packed = self.rest
            tail = torch.nn.functional.pad(parts[:, whole:], (0, width - (k - whole)))
            folded = _fbgemm_product(torch.block_diag(*[tail] * self.fold), packed)  # [f * 2M, N/f]
            into = sums[-1] if sums and k <= _EXACT_K else torch.zeros(2 * rows, folded.shape[1] * self.fold)
            into.view(2 * rows, self.fold, -1).add_(folded.view(self.fold, 2 * rows, -1).transpose(0, 1))
            sums += [] if sums and into is sums[-1] else [into]
        if len(sums) == 1:
            return (sums[0][:rows] - sums[0][rows:])[:, : self.shape[0]]
        total = sum((part[:rows] - part[rows:]).to(torch.int32) for part in sums)
        return cast(torch.Tensor, total)[:, : self.shape[0]].float()

    def held_bytes(self) -> int:
        """The int8 bytes held for this weight: fbgemm's, its padding included, and the plain copy."""
        rows = -(-self.shape[0] // self.fold) * self.fold
        packed = sum(rows * -(-(end - start) // _FBGEMM_K) * _FBGEMM_K for start, end, _ in self.slices)
        rest = rows * (_FBGEMM_K // self.fold) if self.rest is not None else 0
        return packed + rest + self.weight.numel()


def _fbgemm_prepack(weight: torch.Tensor):
    """An int8 weight [N, K] packed for fbgemm's u8 x s8 linear, with scale 1 and zero point 0."""
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packing still takes them
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch._make_per_tensor_quantized_tensor(weight.contiguous(), 1.0, 0)
        return torch.ops.quantized.linear_prepack(quantized, None)
    finally:
        torch.backends.quantized.engine = engine


def _fbgemm_product(parts: torch.Tensor, packed) -> torch.Tensor:
    """Rows of integers in [0, 127] (as float32) times a packed weight: their sums as float32."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(parts.contiguous(), 1.0, 0, packed)


class HalfPackedInt8:
    """An int8 weight [N, K] whose values are also packed as float16 for fbgemm's float16-weight
    linear, in slices of at most _EXACT_K columns. Calling it with int8 rows [M, K] (or their
    integers as float32) gives their exact products as float32: int8 values are exact in float16,
    fbgemm widens them to float32 and multiplies and adds in float32, and a slice's sums are
    integers below 2**24; longer K adds the slices' sums in int32 (the very bits torch._int_mm
    gives, converted as `.float()` converts them). The plain int8 stays for training's backward
    (unpacking fbgemm's float16 layout takes seconds for the head)."""

    def __init__(self, weight: torch.Tensor):
        self.shape = weight.shape
        self.weight = weight
        self.slices = [(start, min(start + _EXACT_K, weight.shape[1]),
                        torch.ops.quantized.linear_prepack_fp16(weight[:, start : start + _EXACT_K].float(), None))
                       for start in range(0, weight.shape[1], _EXACT_K)]

    def __call__(self, quantized: torch.Tensor) -> torch.Tensor:
        if quantized.shape[0] == 0:  # a step whose chunks all end short of sampling asks the head for no rows
            return torch.zeros(0, self.shape[0])
        x = quantized.float()
        if len(self.slices) == 1:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.slices[0][2])
        sums = (torch.ops.quantized.linear_dynamic_fp16(x[:, start:end].contiguous(), packed).to(torch.int32)
                for start, end, packed in self.slices)
        return cast(torch.Tensor, sum(sums)).float()

    def held_bytes(self) -> int:
        """The bytes held for this weight: float16 values and the plain int8 copy."""
        return 3 * self.weight.numel()


def _exact_here(holder) -> bool:
    """Whether `holder(weight)(rows)` gives exact sums here (a torch without the kernel it calls: no)."""
    try:
        return gives_exact_sums(lambda rows, weight: holder(weight)(rows))
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def half_packed_is_exact() -> bool:
    """Whether HalfPackedInt8 gives exact sums here (a torch without fbgemm: no)."""
    return _exact_here(HalfPackedInt8)


@functools.cache
def split_sign_is_exact() -> bool:
    """Whether SplitSignInt8 gives exact sums here (a torch without fbgemm: no)."""
    return _exact_here(SplitSignInt8)


class PlainInt8:
    """An int8 weight [N, K] held once, plain, for the AVX2 int8 kernel (app/engine/int8_kernel.py).
    Calling it with int8 rows [M, K] gives their exact products as float32, the very bits
    torch._int_mm gives converted by `.float()`, for any number of rows. Training's backward reads
    the same copy."""

    def __init__(self, weight: torch.Tensor):
        self.shape = weight.shape
        self.weight = weight

    def __call__(self, quantized: torch.Tensor) -> torch.Tensor:
        return int8_kernel.int8_products(quantized, self.weight)

    def held_bytes(self) -> int:
        """The int8 bytes held for this weight: the plain copy only."""
        return self.weight.numel()


@functools.cache
def plain_kernel_is_exact() -> bool:
    """Whether the AVX2 int8 kernel runs here (AVX2 and a C compiler) and gives exact sums."""
    return int8_kernel.available() and _exact_here(PlainInt8)


class AmxInt8:
    """An int8 weight [N, K] held once, plain, on a CPU with AMX. Calling it with int8 rows [M, K]
    gives their exact products: from `amx_from` rows through the engine's AMX kernel
    (app/engine/int8_kernel.py), as float32; fewer through torch._int_mm, whose one-row path reads a
    layer's weight fastest there, as int32. The very same integers either way, in any row grouping."""

    def __init__(self, weight: torch.Tensor, amx_from: int = 2):
        self.shape = weight.shape
        self.weight = weight
        self.amx_from = amx_from

    def __call__(self, quantized: torch.Tensor) -> torch.Tensor:
        if quantized.shape[0] >= self.amx_from:
            return int8_kernel.int8_products(quantized, self.weight, int8_kernel.AMX)
        return torch._int_mm(quantized, self.weight.t())

    def held_bytes(self) -> int:
        """The int8 bytes held for this weight: the plain copy only."""
        return self.weight.numel()


@functools.cache
def amx_kernel_is_exact() -> bool:
    """Whether the AMX int8 kernel runs here (AMX, a C compiler, and Linux lending the tile state)
    and gives exact sums."""
    return int8_kernel.available(int8_kernel.AMX) and _exact_here(lambda weight: AmxInt8(weight, amx_from=1))


@functools.cache
def amx_products_win() -> bool:
    """Whether the AMX int8 kernel runs here and gives exact sums (amx_kernel_is_exact), and beats
    torch._int_mm and oneDNN's packed product for a few rows (four rows over an [8192, 640] weight;
    on a Sapphire Rapids it read the head at 4 rows in 7.2 ms against 7.4 and 13.1, and a 512-row
    prefill product took 0.4-0.5x their time: bench/README.md)."""
    if not (int_mm_is_fast() and amx_kernel_is_exact()):
        return False
    weight, rows = torch.ones(8192, 640, dtype=torch.int8), torch.ones(4, 640, dtype=torch.int8)
    others = [lambda: torch._int_mm(rows, weight.t())]
    if packed_products_win():
        packed = PackedInt8(weight)
        others.append(lambda: packed(rows))
    amx = AmxInt8(weight)
    return _seconds(lambda: amx(rows), 10) < min(_seconds(other, 10) for other in others)


def amx_reads_one_row_faster(weight: AmxInt8) -> bool:
    """Whether the AMX kernel beats torch._int_mm for one row over this very weight. Measured at load
    for the head, which never stays in cache (a Sapphire Rapids: 6.0-6.8 against 7.7-8.5 ms), where a
    layer's weight, read from cache, goes faster through torch._int_mm (0.015 against 0.022 ms)."""
    row = torch.ones(1, weight.shape[1], dtype=torch.int8)
    by_amx = AmxInt8(weight.weight, amx_from=1)
    return _reads_head_faster(lambda: by_amx(row), lambda: torch._int_mm(row, weight.weight.t()), weight.weight)


FbgemmInt8 = SplitSignInt8 | HalfPackedInt8  # int8 weights held for fbgemm: they take rows as float32 integers
OwnKernelInt8 = PlainInt8 | AmxInt8  # int8 weights held once, plain, for the engine's own kernels
HeldInt8 = OwnKernelInt8 | FbgemmInt8  # int8 weights held for a product other than torch._int_mm alone


def product_weight(weight: torch.Tensor, packed: bool = True) -> "torch.Tensor | HeldInt8":
    """What the integer products read: where torch._int_mm is fast, the int8 weight (held for the
    AMX int8 kernel too, AmxInt8, where that wins); else the int8 weight for the AVX2 int8 kernel
    (PlainInt8) where that runs; else, if `packed`, the int8 weight
    with its values packed as float16 (HalfPackedInt8), else packed for SplitSignInt8 (both keep
    it plain too); else (none exact here) its values as float32."""
    if int_mm_is_fast():
        return AmxInt8(weight) if amx_products_win() else weight
    if plain_kernel_is_exact():
        return PlainInt8(weight)
    if packed and half_packed_is_exact():
        return HalfPackedInt8(weight)
    return SplitSignInt8(weight) if split_sign_is_exact() else weight.float()


def _float_int_mm(quantized: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """quantized [M, K] x weight[N, K]^T in int32, with the int8 values of `weight` (int8, or held
    as float32) multiplied in float32 over slices of K: exact. An int8 weight is converted
    _CONVERTED_ROWS rows at a time, never whole (the head's would take 640 MiB)."""
    x = quantized.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.int32)
    for first in range(0, weight.shape[0], _CONVERTED_ROWS):
        block = weight[first : first + _CONVERTED_ROWS]
        into = out[:, first : first + _CONVERTED_ROWS].zero_()
        for start in range(0, x.shape[1], _EXACT_K):
            into.add_((x[:, start : start + _EXACT_K] @ block[:, start : start + _EXACT_K].float().t()).to(torch.int32))
    return out


class PackedInt8:
    """An int8 weight [N, K] packed once into oneDNN's layout for its u8 x s8 linear. Calling it
    with int8 rows [M, K] gives their int32 products with the weight as float32: every scale is 1,
    so these are the sums torch._int_mm gives, converted as `.float()` converts them."""

    def __init__(self, weight: torch.Tensor):
        self.packed = torch.ops.onednn.qlinear_prepack(weight, None)
        self.ones = torch.ones(weight.shape[0])
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)

    def __call__(self, quantized: torch.Tensor) -> torch.Tensor:
        shifted = quantized.view(torch.uint8).bitwise_xor(0x80)  # v + 128 as uint8: zero point 128
        return torch.ops.onednn.qlinear_pointwise(
            shifted, 1.0, 128, self.packed, self.ones, self.zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )


def packed_int8_is_exact() -> bool:
    """Whether PackedInt8 gives exact sums here (without VNNI its pair sums saturate; a torch
    without oneDNN's int8 linear: no)."""
    return _exact_here(PackedInt8)


@functools.cache
def packed_products_win() -> bool:
    """Whether oneDNN's int8 linear on a weight packed once gives exact sums here and beats
    torch._int_mm for a few rows (four rows over an [8192, 640] weight)."""
    if not int_mm_is_fast():
        return False
    if not packed_int8_is_exact():
        log.warning("oneDNN's packed int8 product gives inexact sums on this CPU: not used")
        return False
    try:
        weight, rows = torch.ones(8192, 640, dtype=torch.int8), torch.ones(4, 640, dtype=torch.int8)
        packed = PackedInt8(weight)
        return _seconds(lambda: packed(rows), 10) < _seconds(lambda: torch._int_mm(rows, weight.t()), 10)
    except (RuntimeError, AttributeError):  # a torch without oneDNN's int8 linear
        return False


def packed_reads_one_row_faster(weight: torch.Tensor, packed: PackedInt8) -> bool:
    """Whether oneDNN's product on the packed weight beats torch._int_mm for one row over this very
    weight. Measured at load for the head, which never stays in cache: which of the two reads it
    nearer the memory bound at one row differs by CPU (a Zen 4 EPYC: packed 8.6 against 13.2 ms;
    a Zen 5: torch._int_mm at ~27 GB/s; bench/README.md)."""
    row = torch.ones(1, weight.shape[1], dtype=torch.int8)
    return _reads_head_faster(lambda: packed(row), lambda: torch._int_mm(row, weight.t()), weight)


def int8_kernel_name(packed: bool) -> str:
    """What computes the int8 products on this CPU, as /health reports it."""
    if not int_mm_is_fast():
        if plain_kernel_is_exact():
            return "cpu: int8 AVX2 kernel (app/engine/int8_avx2.c), plain int8 weights (exact without VNNI)"
        if packed and half_packed_is_exact():
            return "cpu: fbgemm, int8 values packed as float16 (exact without VNNI)"
        if split_sign_is_exact():
            return "cpu: fbgemm int8, rows split by sign (exact without VNNI)"
        return "cpu: int8 values as float32, exact float32 products"
    if amx_products_win():
        return "cpu: torch._int_mm for one row, the AMX int8 kernel (app/engine/int8_amx.c) for more; plain int8 weights"
    return "cpu: torch._int_mm" + (" and oneDNN packed int8" if packed and packed_products_win() else "")


def pack(weight: "torch.Tensor | HeldInt8") -> PackedInt8 | None:
    """`weight` (see product_weight) packed for oneDNN where that is faster here, else None."""
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8:
        return None
    return PackedInt8(weight) if packed_products_win() else None


def _int_mm(quantized: torch.Tensor, weight: "torch.Tensor | HeldInt8", split_up_to: int,
            packed: PackedInt8 | None = None, packed_from: int = 2) -> torch.Tensor:
    """quantized [M, K] x weight[N, K]^T in int32 (weight: see product_weight), or those sums as
    float32 from `packed`, the same weight packed for oneDNN. torch._int_mm has a fast path for one
    row (straight over the weight rows); on some CPUs, for 2..`split_up_to` rows, one-row products
    beat oneDNN's small-M kernel (see one_row_products_win); past that, from `packed_from` rows, the
    packed weight beats it (see packed_products_win, packed_reads_one_row_faster). Integer products
    are exact, so how rows are grouped never changes a result."""
    rows = quantized.shape[0]
    if isinstance(weight, HeldInt8):
        return weight(quantized)
    if weight.dtype == torch.float32 or not int_mm_is_fast():  # int8 values as float32, or a layer's plain int8 view
        return _float_int_mm(quantized, weight)
    if 1 < rows <= split_up_to and one_row_products_win():
        return torch.cat([torch._int_mm(quantized[i : i + 1], weight.t()) for i in range(rows)])
    if rows >= packed_from and packed is not None:
        return packed(quantized)
    return torch._int_mm(quantized, weight.t())


def _int8_matmul(x: torch.Tensor, weight: "torch.Tensor | HeldInt8", weight_scale: torch.Tensor, split_up_to: int,
                 packed: PackedInt8 | None = None, packed_from: int = 2) -> torch.Tensor:
    """x [..., K] float times int8 weight [N, K] with dequantization scales [N] -> float32 [..., N]."""
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(weight, AmxInt8) and rows.dtype == torch.float32 and rows.shape[0] >= weight.amx_from:
        # the AMX kernel quantizes, multiplies and rescales in one call: the same bits, without
        # the passes over memory and the calls of the five ops below (bench/README.md)
        out = int8_kernel.int8_linear(rows, weight.weight, weight_scale)
        return out.view(*x.shape[:-1], weight.shape[0])
    # fbgemm's products read the integers as float32: two conversions fewer per product, where
    # per-op overhead is a good part of a small step
    quantized, scale = _quantize_rows(rows, as_int8=not (isinstance(weight, FbgemmInt8) and rows.dtype == torch.float32))
    out = _int_mm(quantized, weight, split_up_to, packed, packed_from).float().mul_(scale.unsqueeze(-1)).mul_(weight_scale)
    return out.view(*x.shape[:-1], weight.shape[0])


def _dequantized_product(grad: torch.Tensor, weight: "torch.Tensor | HeldInt8", scale: torch.Tensor) -> torch.Tensor:
    """grad [M, N] x (weight [N, K] * scale [N])  -> float32 [M, K], in slices of N so that an
    int8 weight is never dequantized whole."""
    scaled = (grad * scale).float()
    if isinstance(weight, HeldInt8):
        weight = weight.weight
    if weight.dtype == torch.float32:
        return scaled @ weight
    out = torch.zeros(scaled.shape[0], weight.shape[1], dtype=torch.float32, device=grad.device)
    for start in range(0, weight.shape[0], _CONVERTED_ROWS):
        out.addmm_(scaled[:, start : start + _CONVERTED_ROWS], weight[start : start + _CONVERTED_ROWS].float())
    return out


class _Int8MatmulFunction(torch.autograd.Function):
    """x times an int8 weight, with the straight-through backward; the weight is frozen."""

    @staticmethod
    def forward(ctx, x, weight, scale, split_up_to, packed, packed_from):
        ctx.weight = weight  # frozen, and not always a tensor (HeldInt8): kept as it is
        ctx.save_for_backward(scale)
        ctx.x_dtype = x.dtype
        return _int8_matmul(x, weight, scale, split_up_to, packed, packed_from)

    @staticmethod
    def backward(ctx, grad_out):
        weight, (scale,) = ctx.weight, ctx.saved_tensors
        grad = _dequantized_product(grad_out.reshape(-1, weight.shape[0]), weight, scale)
        return grad.view(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype), None, None, None, None, None


# Projections of one module that read the same input, as transformers' models name them.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputProduct:
    """Int8 layers of one module that read the same input (q, k and v; gate and up). The first of
    them called on an input quantizes it once and multiplies it by all their weights in one
    product; the others then take their slice when called on that same tensor object, as models
    call them, one after the other (inference tensors keep no version to tell an in-place
    change by, and no model changes its hidden states between these calls). For small
    products the quantization and the call cost more than the arithmetic, so doing them once
    makes small decode steps faster (bench/README.md). The same bits as one product per layer
    (integer sums are exact, and every column keeps its own scale). Inference only: with gradients
    each layer runs alone."""

    def __init__(self, layers: list):
        self.layers = layers
        ends = itertools.accumulate(layer.out_features for layer in layers)
        self.columns = {layer: slice(end - layer.out_features, end) for layer, end in zip(layers, ends)}
        plain = torch.cat([layer.state.CB for layer in layers])
        self.weight = product_weight(plain)
        # Held for fbgemm: one packed copy for the group, and one plain copy whose rows the layers
        # keep as views (for products alone: training's), no more memory than apart; for the
        # engine's own kernels, the layers read those views with them. Never packed per layer
        # first: a freed packing leaves a hole in the heap that RSS keeps.
        held = isinstance(self.weight, HeldInt8)
        for layer in layers:
            own = plain[self.columns[layer]]
            if isinstance(self.weight, OwnKernelInt8):
                layer.product_weight = type(self.weight)(own)
            else:
                layer.product_weight = own if held else product_weight(layer.state.CB)
        self.scale = torch.cat([layer.dequantize_scale for layer in layers])
        self.packed = pack(self.weight)
        self._kept = threading.local()  # per thread: (input, {layer: output}) not yet taken

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        kept = getattr(self._kept, "outputs", None)
        if kept is not None and kept[0] is x and layer in kept[1]:
            out = kept[1].pop(layer)
            if not kept[1]:
                self._kept.outputs = None
            return out
        product = _int8_matmul(x, self.weight, self.scale, 3, self.packed)
        outputs = {other: _finish(other, product[..., self.columns[other]], x.dtype) for other in self.layers}
        out = outputs.pop(layer)
        self._kept.outputs = (x, outputs)
        return out


def _finish(layer, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if layer.bias is not None:
        out = out + layer.bias
    return out.to(dtype)


def fast_int8_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear8bitLt.forward on the CPU (threshold 0): the same quantization and integer matmul
    in fewer, fused ops (floats rounded in another order, and no fp16 detour)."""
    if torch.is_grad_enabled() and x.requires_grad:
        out = _Int8MatmulFunction.apply(x, self.product_weight, self.dequantize_scale, 3, self.packed_weight, 2)
    elif self.shared_input is not None:
        return self.shared_input(self, x)
    else:
        out = _int8_matmul(x, self.product_weight, self.dequantize_scale, 3, self.packed_weight)
    return _finish(self, out, x.dtype)


def speed_up_int8_layers(model: torch.nn.Module, packed: bool = True) -> int:
    """Give every bitsandbytes int8 layer (threshold 0) the fast inference forward; if `packed`,
    also their weights packed for oneDNN where that is faster here, and one product for layers
    that read the same input (see SharedInputProduct). Returns how many layers."""
    from bitsandbytes.nn import Linear8bitLt

    # bitsandbytes' layers gain attributes and a forward of ours: they are typed Any here.
    layers: list[Any] = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    for layer in layers:
        if layer.weight.CB is not None:
            layer.init_8bit_state()  # what its first forward does: the weights and scales move to its state
    layers = [layer for layer in layers if layer.state.SCB is not None and layer.state.threshold == 0]
    for layer in layers:
        layer.dequantize_scale = layer.state.SCB * _INV_127
        layer.packed_weight = None
        layer.shared_input = None
        layer.forward = types.MethodType(fast_int8_forward, layer)
    if packed:
        for module in model.modules():
            for names in SHARED_INPUTS:
                group: list[Any] = [getattr(module, name, None) for name in names]
                if all(layer in layers for layer in group) and len({layer.in_features for layer in group}) == 1:
                    shared = SharedInputProduct(group)
                    for layer in group:
                        layer.shared_input = shared
    for layer in layers:  # a shared product holds its layers' packed weights; the rest get their own
        if layer.shared_input is None:
            layer.product_weight = product_weight(layer.state.CB, packed)
            layer.packed_weight = pack(layer.product_weight) if packed else None
        if isinstance(layer.shared_input.weight if layer.shared_input else layer.product_weight, HeldInt8):
            layer.state.CB = None  # the product weight holds it: int8 stays int8 in memory
    return len(layers)


def kernel_rows_for(weight: torch.Tensor, product) -> int:
    """Up to how many rows (0, 1, 2 or 4) the AVX2 int8 kernel multiplies this very int8 weight
    faster than `product(rows)`, the route this CPU picked for it. Measured at load for the head,
    which never stays in cache: on a Zen 4 EPYC (AVX-512 VNNI) the kernel read it at one row in 5.7
    against oneDNN's 8.4 ms, at two in 6.9 against 8.5, and lost from four (bench/README.md)."""
    kernel, rows = PlainInt8(weight), 0
    for count in (1, 2, 4):
        x = torch.ones(count, weight.shape[1], dtype=torch.int8)
        if _seconds(lambda x=x: kernel(x), 5) >= _seconds(lambda x=x: product(x), 5):
            break
        rows = count
    return rows


class Int8Head(torch.nn.Module):
    """The LM head as int8 rows with one scale each; float in, float32 logits out."""

    weight: "torch.Tensor | HeldInt8"  # a buffer where it is a tensor
    scale: torch.Tensor  # buffer

    def __init__(self, weight: torch.Tensor, packed: bool = True):
        super().__init__()
        quantized, scale = _quantize_rows(weight.detach().float())
        held = product_weight(quantized, packed)
        if isinstance(held, torch.Tensor):
            self.register_buffer("weight", held)
        else:
            self.weight = held
        self.register_buffer("scale", scale.clamp(min=1e-12))
        self.packed = pack(self.weight) if packed else None
        # The head never stays in cache. Where the packed weight is not there, two rows gain from being
        # split: torch._int_mm's one-row path reads it near the memory bound; else one read serves both.
        self.split_up_to = 1 if self.packed is not None else 2
        self.packed_from = 2  # rows from which the packed weight is read (see packed_reads_one_row_faster)
        if isinstance(held, torch.Tensor) and self.packed is not None and packed_reads_one_row_faster(held, self.packed):
            self.packed_from = 1
        if isinstance(held, AmxInt8) and amx_reads_one_row_faster(held):
            held.amx_from = 1
        # Up to kernel_rows rows, the AVX2 int8 kernel reads the same int8 weight, where it measures
        # faster than the route above (the same bits: every route is exact)
        self.kernel_rows, self.kernel_weight = 0, None
        if isinstance(held, torch.Tensor) and held.dtype == torch.int8 and plain_kernel_is_exact():
            self.kernel_rows = kernel_rows_for(held, lambda x: _int_mm(x, held, self.split_up_to, self.packed,
                                                                        self.packed_from))
            self.kernel_weight = PlainInt8(held) if self.kernel_rows else None

    @property
    def one_row_like_more(self) -> bool:
        """Whether its one-row products take the route of more rows (packed, or the AMX kernel), for /health."""
        return self.packed_from == 1 or (isinstance(self.weight, AmxInt8) and self.weight.amx_from == 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // hidden.shape[-1]
        weight = self.kernel_weight if 0 < rows <= self.kernel_rows else self.weight
        return _Int8MatmulFunction.apply(hidden, weight, self.scale, self.split_up_to, self.packed,
                                         self.packed_from).to(hidden.dtype)
