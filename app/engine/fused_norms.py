"""RMS norms as torch's one fused op instead of transformers' eight small ones.

A decoder layer of Gemma 3 runs six RMS norms (Llama and Qwen: two), each written in Python as
pow, mean, add, rsqrt and multiplications. At one decoding row these small ops cost more than their
arithmetic: on Gemma 3 270M the 109 norms of a step took 22 us each, `F.rms_norm` 11 (measured:
bench/README.md). A norm is switched only where the fused op gives the very bits of the module's
own forward on probe inputs at load, so outputs, the reference checks and batch invariance
(docs/engine.md, property 6) are untouched; any other norm keeps its forward.
"""

import types
from typing import Any

import torch

# How a norm's weight scales the normalized input: Llama's (w) and Gemma's (1 + w).
_SCALES = (lambda weight: weight, lambda weight: 1.0 + weight.float())


def _probe_inputs(width: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Rows of very different magnitudes, in the shapes models norm: [1, T, hidden] and [1, T, heads, head_dim]."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, width, generator=generator) * torch.rand(*shape, 1, generator=generator) * 100).to(dtype)
            for shape in ((1, 1), (1, 37), (1, 5, 4))]


def _fused_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(hidden, self.fused_shape, self.fused_scale, self.fused_eps)


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
                    module.forward = types.MethodType(_fused_forward, module)
                    fused += 1
                    break
    return fused
