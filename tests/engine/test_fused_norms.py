"""Fused RMS norms: switched only where they give the module's own bits, in inference by the float
kernel where it gives them too, and the model's logits stay the same bits either way."""

from unittest.mock import patch

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine import float_kernel
from app.engine.fused_norms import fuse_rms_norms
from tests.conftest import tiny_gemma2_config, tiny_gemma_config, tiny_llama_config


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("config", [tiny_gemma_config, tiny_llama_config, tiny_gemma2_config])
@pytest.mark.parametrize("inference", [True, False], ids=["inference", "gradients"])
def test_fused_norms_give_the_models_own_logits(config, inference):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    with torch.no_grad():
        for norm in _norms(model):  # the default init (zeros for Gemma's 1 + w, ones for Llama's) hides a wrong scale
            norm.weight.normal_(0, 0.5)
    ids = torch.randint(3, 512, (2, 24))
    with torch.set_grad_enabled(not inference):  # with gradients (training) torch's op computes them
        expected = model(ids).logits
        fused, by_kernel = fuse_rms_norms(model, torch.float32)
        assert fused == len(_norms(model)) > 0
        assert by_kernel == (fused if float_kernel.available() else 0)
        assert all(norm.forward.__name__ == "_fused_forward" for norm in _norms(model))
        with patch.object(float_kernel, "rms_norm", wraps=float_kernel.rms_norm) as kernel:
            assert torch.equal(model(ids).logits, expected)
    assert kernel.call_count == (by_kernel if inference else 0)  # each norm once in the pass


def test_a_kernel_that_does_not_give_the_norms_bits_is_not_taken():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        with patch.object(float_kernel, "rms_norm", lambda x, scale, eps: x * scale):  # no normalizing
            assert fuse_rms_norms(model, torch.float32) == (len(_norms(model)), 0)
            assert torch.equal(model(ids).logits, expected)  # torch's op in inference too


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
    assert fuse_rms_norms(model, torch.float32) == (0, 0)
    assert "forward" not in vars(model[0])
    assert torch.equal(model(x), expected)


def test_the_default_model_serves_with_every_norm_fused(real_base):
    norms = _norms(real_base.model)
    assert len(norms) == 18 * 6 + 1  # Gemma 3 270M: six per layer, one final
    assert all(norm.forward.__name__ == "_fused_forward" for norm in norms)
    assert all(norm.by_kernel for norm in norms) == float_kernel.available()


def test_the_gpu_path_keeps_transformers_norms(gemma_on_gpu_path):
    assert not any(norm.forward.__name__ == "_fused_forward" for norm in _norms(gemma_on_gpu_path.model))
