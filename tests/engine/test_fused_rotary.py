"""Fused rotary embedding: a modeling module's apply_rotary_pos_emb switched only where the float
kernel gives its bits; inference takes the kernel, everything else the original, and the model's
logits stay the same bits either way."""

import sys
import types
from unittest.mock import patch

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine import float_kernel, fused_rotary
from tests.conftest import tiny_gemma2_config, tiny_gemma_config, tiny_llama_config


@pytest.fixture(autouse=True)
def kernel_here():
    if not float_kernel.available():
        pytest.skip("the float kernel does not run here (no AVX2, or no C compiler)")


def _original(module: types.ModuleType):
    function = getattr(module, fused_rotary.NAME)
    return getattr(function, "original", function)


@pytest.fixture
def unswitched(monkeypatch):
    """Modeling modules as transformers ships them, restored after the test (a load switches them
    for the whole process)."""
    def restore(model: torch.nn.Module) -> None:
        for module in {sys.modules[type(part).__module__] for part in model.modules()}:
            if hasattr(module, fused_rotary.NAME):
                monkeypatch.setattr(module, fused_rotary.NAME, _original(module))
    return restore


@pytest.mark.parametrize("config", [tiny_gemma_config, tiny_llama_config, tiny_gemma2_config])
@pytest.mark.parametrize("inference", [True, False], ids=["inference", "gradients"])
def test_fused_rotary_gives_the_models_own_logits(config, inference, unswitched):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config()).eval()
    unswitched(model)
    ids = torch.randint(3, 512, (1, 24))  # the engine's one flat sequence
    with torch.set_grad_enabled(not inference):  # with gradients (training) the original computes them
        expected = model(ids).logits
        assert fused_rotary.fuse_rotary(model) == 1
        modeling = sys.modules[type(model).__module__]
        assert getattr(modeling, fused_rotary.NAME) is not _original(modeling)
        with patch.object(float_kernel, "rotary", wraps=float_kernel.rotary) as kernel:
            assert torch.equal(model(ids).logits, expected)
    layers = model.config.num_hidden_layers
    assert kernel.call_count == (2 * layers if inference else 0)  # queries and keys of every layer
    assert fused_rotary.fuse_rotary(model) == 1  # a second load finds it switched
    assert getattr(modeling, fused_rotary.NAME).original is _original(modeling)


def test_a_function_the_kernel_does_not_give_is_kept(monkeypatch):
    module = types.ModuleType("fake_modeling")

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # rotates the other way
        rotate = lambda x: torch.cat((x[..., x.shape[-1] // 2:], -x[..., : x.shape[-1] // 2]), dim=-1)  # noqa: E731
        return q * cos.unsqueeze(1) + rotate(q) * sin.unsqueeze(1), k * cos.unsqueeze(1) + rotate(k) * sin.unsqueeze(1)

    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    monkeypatch.setitem(sys.modules, "fake_modeling", module)
    layer = type("Layer", (torch.nn.Module,), {"__module__": "fake_modeling"})()
    assert fused_rotary.fuse_rotary(layer) == 0
    assert module.apply_rotary_pos_emb is apply_rotary_pos_emb


def test_only_the_usual_call_in_inference_takes_the_kernel(unswitched):
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    unswitched(model)
    fused_rotary.fuse_rotary(model)
    switched, original = modeling_llama.apply_rotary_pos_emb, _original(modeling_llama)
    q, k, cos, sin = fused_rotary._probes()
    with patch.object(float_kernel, "rotary", wraps=float_kernel.rotary) as kernel, torch.no_grad():
        for call in (lambda f: f(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2),  # [1, T, H, D]
                     lambda f: f(q.double(), k.double(), cos.double(), sin.double()),
                     lambda f: f(q, k, cos[:, :5], sin[:, :5])):  # not its shapes: the original's error
            try:
                expected = call(original)
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    call(switched)
                continue
            assert all(torch.equal(a, b) for a, b in zip(call(switched), expected))
        assert kernel.call_count == 0
        assert all(torch.equal(a, b) for a, b in zip(switched(q, k, cos, sin), original(q, k, cos, sin)))
        assert kernel.call_count == 2


def test_the_default_model_serves_with_rotary_by_the_kernel(real_base):
    modeling = sys.modules[type(real_base.model).__module__]
    assert hasattr(getattr(modeling, fused_rotary.NAME), "original")
