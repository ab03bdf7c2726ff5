"""The model as training calls it, without touching the model that serves.

Serving and training share ONE copy of the weights, so training may not flip flags on modules
serving uses (train mode, `gradient_checkpointing_enable()`, hooks). Instead it calls the model
through a view: a copy of the module objects on the path from the root down to the list of
decoder layers, whose layers are wrapped in `_TrainingLayer`. Every weight, buffer and every other
module is the model's own object; only the view's wrappers differ. Each wrapped layer
  - marks a pause point (app.engine.device) before it runs, and another in backward, where the
    gradient reaches its output (a hook on that tensor, which is training's own): waiting
    inference runs there, so serving waits for one layer at most, forward or backward;
  - optionally runs through `torch.utils.checkpoint`: its activations are recomputed in backward
    instead of kept.
"""

import copy
import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from app.engine.device import let_serving_run


class _TrainingLayer(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, checkpointed: bool, model: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.checkpointed = checkpointed
        self.__dict__["model"] = model  # whose pauses these are; not a submodule of the view

    def forward(self, *args, **kwargs):
        let_serving_run(self.model)
        if self.checkpointed:
            out = checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        else:
            out = self.layer(*args, **kwargs)
        pause_in_backward(out[0] if isinstance(out, tuple) else out, self.model)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model's forward reads off its layers (e.g. attention_type)
            return getattr(super().__getattr__("layer"), name)


def decoder_layers_path(model: torch.nn.Module) -> list[str]:
    """Attribute names from the root to the model's list of decoder layers."""
    config: Any = model.config
    count = config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name.split(".")
    raise ValueError(f"{type(model).__name__}: no list of {count} decoder layers found")


def pause_in_backward(tensor: torch.Tensor, model: torch.nn.Module) -> None:
    """A pause point in backward, where the gradient with respect to `tensor` has been computed,
    on whatever thread autograd computes it."""
    if tensor.requires_grad:
        tensor.register_hook(functools.partial(_pause, model))


def _pause(model: torch.nn.Module, grad: torch.Tensor) -> None:
    let_serving_run(model)  # the gradient passes on unchanged


@functools.cache
def training_view(model: torch.nn.Module, checkpointed: bool) -> torch.nn.Module:
    """`model` with its decoder layers wrapped (see the module's doc); nothing of `model` changes."""
    *parents, layers_name = decoder_layers_path(model)
    view = copy.copy(model)
    view._modules = dict(model._modules)
    node: Any = view  # modules down the path, each as its parent holds it
    for name in parents:
        child = copy.copy(node._modules[name])
        child._modules = dict(child._modules)
        node._modules[name] = child
        node = child
    node._modules[layers_name] = torch.nn.ModuleList(
        _TrainingLayer(layer, checkpointed, model) for layer in node._modules[layers_name])
    return view
