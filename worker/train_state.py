"""A training run's state at a step boundary, and its files in shared storage.

Saved at each evaluation, so that a run whose node was lost, stopped or paused past the stale
timeout goes on from there on whichever node claims the job next, instead of from step 0: the
trainable tensors, the optimizer's state, the step, where the run is in the data (the examples
still to come in this pass and the shuffler's state), and the best prompt so far with its figures.

Files: `state.safetensors` (every tensor) and `state.json` (the rest). No pickle: safetensors and
JSON only, as for adapters.
"""

import json
import random
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

TENSORS, FIGURES = "state.safetensors", "state.json"


@dataclass
class TrainState:
    step: int  # steps done: the run goes on with step + 1
    trainable: dict[str, torch.Tensor]  # Trainable.state_dict()
    optimizer: dict  # optimizer.state_dict()
    loss_scale: dict  # GradScaler.state_dict(): empty unless the model computes in float16
    order: list[int]  # indices of the examples still to come in this pass, in order
    shuffler: tuple  # random.Random.getstate() of the pass shuffler
    best_prompt: torch.Tensor
    best_step: int
    best_loss: float | None
    best_accuracy: float | None
    evals_without_gain: int
    elapsed_s: float  # training time so far (time budgets and the learning-rate schedule read it)


def encode(state: TrainState) -> dict[str, bytes]:
    tensors = {f"trainable.{name}": value for name, value in state.trainable.items()}
    tensors["best_prompt"] = state.best_prompt
    optimizer_values: dict[str, dict] = {}
    for index, entries in state.optimizer["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                optimizer_values.setdefault(str(index), {})[name] = value
    version, internal, gauss = state.shuffler
    figures = {
        "step": state.step, "order": state.order, "shuffler": [version, list(internal), gauss],
        "best_step": state.best_step, "best_loss": state.best_loss, "best_accuracy": state.best_accuracy,
        "evals_without_gain": state.evals_without_gain, "elapsed_s": state.elapsed_s,
        "optimizer_groups": state.optimizer["param_groups"], "optimizer_values": optimizer_values,
        "loss_scale": state.loss_scale,
    }
    tensors = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    return {TENSORS: save(tensors), FIGURES: json.dumps(figures).encode()}


def decode(files: dict[str, bytes]) -> TrainState:
    tensors, figures = load(files[TENSORS]), json.loads(files[FIGURES])
    optimizer_state: dict[int, dict] = {}
    for index, values in figures["optimizer_values"].items():
        optimizer_state.setdefault(int(index), {}).update(values)
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[key] = value
    version, internal, gauss = figures["shuffler"]
    return TrainState(
        step=figures["step"],
        trainable={name.removeprefix("trainable."): value for name, value in tensors.items()
                   if name.startswith("trainable.")},
        optimizer={"state": optimizer_state, "param_groups": figures["optimizer_groups"]},
        loss_scale=figures["loss_scale"],
        order=figures["order"], shuffler=(version, tuple(internal), gauss), best_prompt=tensors["best_prompt"],
        best_step=figures["best_step"], best_loss=figures["best_loss"], best_accuracy=figures["best_accuracy"],
        evals_without_gain=figures["evals_without_gain"], elapsed_s=figures["elapsed_s"],
    )


def shuffler_from(state: TrainState | None, seed: int) -> random.Random:
    """The pass shuffler: fresh from the seed, or where the saved run left it."""
    shuffler = random.Random(seed)
    if state is not None:
        shuffler.setstate(state.shuffler)
    return shuffler
