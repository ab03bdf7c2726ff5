"""The only places where an engine step copies between the host and the device.

A step's inputs (token ids, positions, cache slots, attention groups, sampling parameters) are
worked out on the host. On a GPU every small tensor made from host values is a blocking copy of
its own, so they are gathered into one int64 buffer and sent in ONE copy (`StepInputs.send`);
floats travel bit-cast inside it. The step's results (the sampled tokens and whether each row's
logits were usable) come back in ONE copy too (`to_host`). Tests count the calls of these two.
"""

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The step's one host-to-device copy."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def to_host(tensor: torch.Tensor) -> list:
    """The step's one device-to-host copy (blocking: the host needs the values)."""
    return tensor.tolist()


class Sent:
    """A part of the step's inputs: its device tensor once the inputs are sent."""

    def __init__(self, inputs: "StepInputs", index: int, shape: tuple[int, ...], dtype: torch.dtype):
        self._inputs, self._index, self._shape, self._dtype = inputs, index, shape, dtype

    @property
    def tensor(self) -> torch.Tensor:
        assert self._inputs.sent is not None, "read after StepInputs.send"
        part = self._inputs.sent[self._index]
        return (part if self._dtype == torch.int64 else part.view(self._dtype)).view(self._shape)


class StepInputs:
    """A step's inputs, gathered on the host and sent to the device in one copy."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self.sent: list[torch.Tensor] | None = None

    def ints(self, values, shape: tuple[int, ...] | None = None) -> Sent:
        part = torch.as_tensor(values, dtype=torch.int64).reshape(-1)
        self._parts.append(part)
        return Sent(self, len(self._parts) - 1, shape or (part.numel(),), torch.int64)

    def floats(self, values) -> Sent:
        """float64 values, bit-cast into the int64 buffer (the device reads them back as float64)."""
        part = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        self._parts.append(part.view(torch.int64))
        return Sent(self, len(self._parts) - 1, (part.numel(),), torch.float64)

    def send(self, device: torch.device) -> None:
        flat = torch.cat(self._parts) if self._parts else torch.empty(0, dtype=torch.int64)
        self.sent = list(to_device(flat, device).split([part.numel() for part in self._parts]))
