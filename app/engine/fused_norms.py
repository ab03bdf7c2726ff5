"""RMS norms in one pass (app.engine.float_kernel) or torch's one op, instead of transformers' eight.

A decoder layer of Gemma 3 runs six RMS norms (Llama and Qwen: two), each written in Python as
pow, mean, add, rsqrt and multiplications. At one decoding row these small ops cost more than their
arithmetic, and at prefill's hundreds of rows their passes over memory. A norm is switched only
where `F.rms_norm` gives the very bits of the module's own forward on probe inputs at load, which
also tells whether its weight scales as Llama's (w) or Gemma's (1 + w); any other norm keeps its
forward. In inference on the CPU the switched norm runs the engine's kernel (checked against those
bits at load, to float32 rounding: it sums the squares in another order), elsewhere `F.rms_norm`
(training, which needs its gradients; the GPU). Both normalize each row alone, so rows stay
batch-invariant (docs/engine.md, property 6).
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
    if self.kernel_checked and float_kernel.takes(hidden):
        return float_kernel.rms_norm(hidden, self.fused_scale, self.fused_eps)
    return torch.nn.functional.rms_norm(hidden, self.fused_shape, self.fused_scale, self.fused_eps)


def _kernel_agrees(probes: list[torch.Tensor], expected: list[torch.Tensor], scale: torch.Tensor, eps: float) -> bool:
    return scale.dtype == torch.float32 and all(
        float_kernel.takes(x) and torch.allclose(float_kernel.rms_norm(x, scale, eps), out, rtol=1e-5, atol=1e-5)
        for x, out in zip(probes, expected))


def fuse_rms_norms(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Give the fused forward to every RMS norm of `model` whose output `F.rms_norm` reproduces bit
    for bit on `dtype` inputs. Returns how many were switched."""
    fused = 0
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
                    module.kernel_checked = _kernel_agrees(probes, expected, scale, eps)
                    module.forward = types.MethodType(_fused_forward, module)
                    fused += 1
                    break
    return fused
