"""Fused gated MLPs: only GELU-tanh MLPs of the gated formula are switched; their output is the
module's own to float32 rounding in inference, and its very bits with gradients (training)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.activations import GELUTanh

from app.engine import float_kernel
from app.engine.fused_mlp import fuse_gated_mlps
from tests.conftest import tiny_gemma2_config, tiny_gemma_config, tiny_llama_config


@pytest.fixture(autouse=True)
def kernel_here():
    if not float_kernel.available():
        pytest.skip("the float kernel does not run here (no AVX2, or no C compiler): no MLP is switched")


def _fused(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if module.forward.__name__ == "_fused_forward"]


@pytest.mark.parametrize("config", [tiny_gemma_config, tiny_gemma2_config])
def test_gemmas_mlps_are_fused_and_give_the_models_own_logits(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    embeds = torch.randn(2, 24, model.config.hidden_size)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds).logits
    assert fuse_gated_mlps(model) == model.config.num_hidden_layers == len(_fused(model))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected, rtol=1e-5, atol=1e-5)
    trained = model(inputs_embeds=embeds.clone().requires_grad_()).logits
    assert torch.equal(trained.detach(), expected) and trained.requires_grad


def test_silu_mlps_keep_their_forward():
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    assert fuse_gated_mlps(model) == 0 and not _fused(model)


class UpGatedMLP(torch.nn.Module):
    """Gate, up, down and a GELU-tanh, but the activation on up: not the formula the kernel computes."""

    def __init__(self, width: int):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(width, 2 * width), torch.nn.Linear(width, 2 * width)
        self.down_proj, self.act_fn = torch.nn.Linear(2 * width, width), GELUTanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_an_mlp_of_another_formula_keeps_its_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(UpGatedMLP(16))
    x = torch.randn(3, 16)
    expected = model(x)
    assert fuse_gated_mlps(model) == 0
    assert "forward" not in vars(model[0]) and torch.equal(model(x), expected)


def test_the_default_model_serves_with_every_mlp_fused(real_base):
    assert sum(type(module).__name__ == "Gemma3MLP" for module in _fused(real_base.model)) == 18


def test_the_gpu_path_keeps_transformers_mlps(gemma_on_gpu_path):
    assert not any(type(module).__name__ == "Gemma3MLP" for module in _fused(gemma_on_gpu_path.model))
