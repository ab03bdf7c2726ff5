"""Rotary position embedding in one pass (app.engine.float_kernel.rotary) instead of transformers'
five ops.

transformers' attention modules call their modeling module's `apply_rotary_pos_emb(q, k, cos, sin)`:
q * cos + rotate_half(q) * sin, and the same for k, where rotate_half negates and concatenates the
halves. On the CPU that is five passes over the queries and five over the keys per layer: in a
decode step, ten small ops per layer; in a prefill step, a few percent of it. That function is
switched, once per modeling module, for one that hands float32 CPU inference of the usual shapes to
the kernel and everything else (gradients, another device or dtype, other arguments) to the
original; only where the kernel gives the original's bits on probe inputs at load, so outputs, the
reference checks and batch invariance (docs/engine.md, property 6) are untouched. The switch is
the module's, so other models of that architecture in the process take it too, with the same bits.
"""

import functools
import sys
from collections.abc import Callable

import torch

from app.engine import float_kernel

NAME = "apply_rotary_pos_emb"


def _probes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys as attention modules make them ([1, heads, T, dim] views of [1, T, heads,
    dim]), and angles' cosines and sines of [1, T, dim]."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 37, 4, 64, generator=generator).transpose(1, 2) * 30
    k = torch.randn(1, 37, 1, 64, generator=generator).transpose(1, 2) * 30
    angles = torch.rand(1, 37, 64, generator=generator) * 100
    return q, k, angles.cos(), angles.sin()


def _switched(original: Callable) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not args and not kwargs and float_kernel.rotates(q, cos, sin) and float_kernel.rotates(k, cos, sin):
            return float_kernel.rotary(q, cos, sin), float_kernel.rotary(k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _gives_its_bits(original: Callable) -> bool:
    q, k, cos, sin = _probes()
    try:
        with torch.no_grad():
            expected = original(q, k, cos, sin)
            got = _switched(original)(q, k, cos, sin)
    except Exception:  # another signature: not the function the kernel computes
        return False
    return all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def fuse_rotary(model: torch.nn.Module) -> int:
    """Switch `apply_rotary_pos_emb` of every modeling module whose classes make up `model`, where
    the kernel gives its bits (and the kernel is built). Returns how many modules use the switched
    function, whether switched now or by an earlier load."""
    if not float_kernel.available():
        return 0
    modules = {sys.modules[type(part).__module__] for part in model.modules()}
    switched = 0
    for module in modules:
        function = getattr(module, NAME, None)
        if function is None:
            continue
        if not hasattr(function, "original"):
            if not _gives_its_bits(function):
                continue
            setattr(module, NAME, _switched(function))
        switched += 1
    return switched
