"""Fused RMS norms: switched only where they give the module's own bits, and the model's logits stay
the same bits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine.fused_norms import fuse_rms_norms
from tests.conftest import tiny_gemma2_config, tiny_gemma_config, tiny_llama_config


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("config", [tiny_gemma_config, tiny_llama_config, tiny_gemma2_config])
def test_fused_norms_give_the_models_own_logits(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    with torch.no_grad():
        for norm in _norms(model):  # the default init (zeros for Gemma's 1 + w, ones for Llama's) hides a wrong scale
            norm.weight.normal_(0, 0.5)
        ids = torch.randint(3, 512, (2, 24))
        expected = model(ids).logits
        assert fuse_rms_norms(model, torch.float32) == len(_norms(model)) > 0
        assert all(norm.forward.__name__ == "_fused_forward" for norm in _norms(model))
        assert torch.equal(model(ids).logits, expected)


class CenteredRMSNorm(torch.nn.Module):
    """Named like an RMS norm, but centres its input first: no fused RMS norm gives its bits."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        centred = hidden - hidden.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def test_a_norm_the_fused_op_does_not_match_keeps_its_forward():
    model = torch.nn.Sequential(CenteredRMSNorm(64))
    x = torch.randn(3, 64) + 5
    expected = model(x)
    assert fuse_rms_norms(model, torch.float32) == 0
    assert "forward" not in vars(model[0])
    assert torch.equal(model(x), expected)


def test_the_default_model_serves_with_every_norm_fused(real_base):
    norms = _norms(real_base.model)
    assert len(norms) == 18 * 6 + 1  # Gemma 3 270M: six per layer, one final
    assert all(norm.forward.__name__ == "_fused_forward" for norm in norms)


def test_the_gpu_path_keeps_transformers_norms(gemma_on_gpu_path):
    assert not any(norm.forward.__name__ == "_fused_forward" for norm in _norms(gemma_on_gpu_path.model))
