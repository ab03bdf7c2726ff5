"""A gated MLP's gelu(gate) * up in one pass (app.engine.float_kernel) instead of torch's GELU and
a multiplication.

Gemma's MLP is down(gelu_tanh(gate(x)) * up(x)). torch's tanh-approximated GELU is several times
slower on the CPU than the tanh inside it, and the multiplication is another pass over the
activations (bench/README.md). A module is switched only where, on probe inputs at load, its
activation is that GELU and its forward is that formula, both to float32 rounding (the kernel
computes GELU as gate / (1 + e^(-2y)), torch as 0.5 gate (1 + tanh(y))). The kernel runs where it
takes the activations (inference on the CPU); training keeps torch's ops and their gradients.
"""

import types
from typing import Any

import torch

from app.engine import float_kernel


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if float_kernel.takes(gate) and float_kernel.takes(up):
        return self.down_proj(float_kernel.gelu_tanh_mul(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal to float32 rounding, or (after an int8 layer) to one step of its inputs' quantization."""
    return bool((got - expected).abs().max() <= 1e-3 * expected.abs().max())


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Give the fused forward to every gated GELU-tanh MLP of `model`. Returns how many were switched."""
    if not float_kernel.available():
        return 0
    generator = torch.Generator().manual_seed(0)
    activations = torch.linspace(-12, 12, 4001)  # and both tails
    gelu = float_kernel.gelu_tanh_mul(activations, torch.ones_like(activations))
    fused = 0
    module: Any  # an MLP gains a forward of ours
    for module in model.modules():
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        with torch.no_grad():
            if not torch.allclose(gelu, module.act_fn(activations), rtol=1e-5, atol=1e-6):
                continue
            probe = torch.randn(1, 5, module.gate_proj.in_features, generator=generator)
            expected = module(probe)
            module.forward = types.MethodType(_fused_forward, module)
            if _close(module(probe), expected):
                fused += 1
            else:
                del module.forward
    return fused
