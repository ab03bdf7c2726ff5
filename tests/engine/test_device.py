"""Training's pause points reach the engine from whatever thread computes them: on CUDA autograd
runs backward (and its hooks) on threads of its own."""

import threading

import torch

from app.engine.device import let_serving_run, pausing
from app.engine.model_view import training_view
from tests.test_architectures import EXAMPLES, TEMPLATE
from worker.training import Row, VirtualTokens, encode_example, target_losses


def test_pause_points_in_a_backward_run_on_another_thread_still_pause(tiny_base):
    calls: list[int] = []
    view = training_view(tiny_base.model, checkpointed=True)
    prompt = (torch.randn(4, tiny_base.hidden_size) * 0.3).requires_grad_()
    batch = [Row.of(*encode_example(tiny_base, e, TEMPLATE, 64)) for e in EXAMPLES]
    with pausing(tiny_base.model, lambda: calls.append(threading.get_ident())):
        loss = target_losses(tiny_base, VirtualTokens("prompt_tuning", prompt), batch, view).sum()
        in_forward = len(calls)
        backward = threading.Thread(target=loss.backward)
        backward.start()
        backward.join()
    layers = tiny_base.model.config.num_hidden_layers
    assert in_forward == layers + 1  # before each decoder layer and the LM head
    assert calls[in_forward:] == [backward.ident] * (layers + 1)  # after the head's and each layer's gradient
    assert prompt.grad is not None


def test_a_model_without_training_work_running_never_pauses(tiny_base):
    with pausing(torch.nn.Linear(1, 1), lambda: (_ for _ in ()).throw(AssertionError("another model's pause"))):
        let_serving_run(tiny_base.model)  # nothing registered for this model: a no-op
