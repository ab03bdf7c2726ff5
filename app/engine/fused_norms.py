"""RMS norms in one op instead of transformers' eight small ones: torch's fused op, or in CPU
inference the engine's float kernel, which gives the same bits in one pass.

A decoder layer of Gemma 3 runs six RMS norms (Llama and Qwen: two), each written in Python as
pow, mean, add, rsqrt and multiplications. At one decoding row these small ops cost more than their
arithmetic: on Gemma 3 270M the 109 norms of a step took 22 us each, `F.rms_norm` 11 (measured:
bench/README.md). On the CPU `F.rms_norm` is itself those ops, each a pass over the activations;
the float kernel reads a row once and sums its squares in torch's own order. A norm is switched
only where `F.rms_norm` gives the very bits of the module's own forward on probe inputs at load,
and the kernel takes inference only where it gives them too (a torch that sums in another order
keeps `F.rms_norm`), so outputs, the reference checks and batch invariance (docs/engine.md,
property 6) are untouched. Training keeps torch's op, which autograd differentiates. Any other norm
keeps its forward.
"""

import types
from typing import Any

import torch

from app.engine import float_kernel

# How a norm's weight scales the normalized input: Llama's (w) and Gemma's (1 + w).
_SCALES = (lambda weight: weight, lambda weight: 1.0 + weight.float())


def _probe_inputs(width: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Rows of very different magnitudes, in the shapes models norm: [1, T, hidden] and [1, T, heads, head_dim]."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, width, generator=generator) * torch.rand(*shape, 1, generator=generator) * 100).to(dtype)
            for shape in ((1, 1), (1, 37), (1, 5, 4))]


def _fused_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    if self.by_kernel and float_kernel.takes(hidden):
        return float_kernel.rms_norm(hidden, self.fused_scale, self.fused_eps)
    return torch.nn.functional.rms_norm(hidden, self.fused_shape, self.fused_scale, self.fused_eps)


def _kernel_gives(probes: list[torch.Tensor], expected: list[torch.Tensor], scale: torch.Tensor, eps: float) -> bool:
    """Whether the float kernel gives this norm's bits here on every probe."""
    return scale.dtype == torch.float32 and all(map(float_kernel.takes, probes)) \
        and all(torch.equal(float_kernel.rms_norm(x, scale, eps), out) for x, out in zip(probes, expected))


def fuse_rms_norms(model: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Give the fused forward to every RMS norm of `model` whose output `F.rms_norm` reproduces bit
    for bit on `dtype` inputs. Returns how many were switched, and how many of those the float
    kernel computes, with the same bits, in inference."""
    fused = by_kernel = 0
    module: Any  # a norm gains attributes and a forward of ours
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
        if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.dim() != 1 \
                or not isinstance(eps, float):
            continue
        probes = _probe_inputs(weight.shape[0], dtype)
        with torch.no_grad():
            expected = [module(x) for x in probes]
            for scale_of in _SCALES:
                scale = scale_of(weight.detach())
                if all(torch.equal(torch.nn.functional.rms_norm(x, weight.shape, scale, eps), out)
                       for x, out in zip(probes, expected)):
                    module.fused_shape, module.fused_scale, module.fused_eps = tuple(weight.shape), scale, eps
                    module.by_kernel = _kernel_gives(probes, expected, scale, eps)
                    module.forward = types.MethodType(_fused_forward, module)
                    fused += 1
                    by_kernel += module.by_kernel
                    break
    return fused, by_kernel
