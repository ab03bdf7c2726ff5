"""Which floating-point dtype the resident model computes in, per device and model.

The int8 weights are int8 whatever this says; the compute dtype is that of everything else:
activations, norms, the embeddings and soft prompts, the KV cache, the LM head where it is not int8.
  - CPU: float32, around the int8 products (the CPU's int8 fast path computes in float32 anyway).
  - CUDA: bfloat16 where the device has it (compute capability 8 and up: Ampere, Ada, Hopper);
    float16 only where a probe (a forward over a fixed text) keeps every activation well inside
    float16's range; float32 otherwise. Gemma 3's residual stream passes 100,000 on plain text,
    past float16's 65,504: in float16 its logits are inf.
COMPUTE_DTYPE overrides the choice; an explicit float16 on a model the probe says overflows is
refused at start, naming the module and the magnitude.
"""

from dataclasses import dataclass

import torch

FLOAT16_MAX = torch.finfo(torch.float16).max
# float16 is taken only where the probe's largest activation is this many times below its maximum:
# other inputs than the probe's may reach further.
FLOAT16_HEADROOM = 4.0
PROBE_TEXT = (
    "Review: a gripping, funny and beautifully acted film, though its last act drags.\nSentiment: positive\n\n"
    "Question: What is the capital of France?\nAnswer: Paris is the capital and largest city of France.\n\n"
    "def add(a, b):\n    return a + b\n"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Float16Overflow(ValueError):
    """COMPUTE_DTYPE=float16 was asked for a model whose activations do not fit float16."""


@dataclass(frozen=True)
class Plan:
    dtype: torch.dtype  # the dtype to load the model in
    probe_float16: bool  # load in float32 first, probe, and take float16 only if it fits


def plan(setting: str, device: torch.device, bfloat16_capable: bool) -> Plan:
    """The dtype COMPUTE_DTYPE (`auto` or a dtype's name) asks for on `device`."""
    if setting == "float16" or (setting == "auto" and device.type == "cuda" and not bfloat16_capable):
        return Plan(torch.float16, probe_float16=True)
    if setting == "auto":
        return Plan(torch.bfloat16 if device.type == "cuda" else torch.float32, probe_float16=False)
    return Plan(DTYPES[setting], probe_float16=False)


def bfloat16_capable(device: torch.device) -> bool:
    """Whether the device computes in bfloat16 at speed (CUDA: compute capability 8 and up)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass(frozen=True)
class Probe:
    module: str  # the module whose output is largest
    magnitude: float  # the largest |value| any module output reached

    @property
    def fits_float16(self) -> bool:
        return self.magnitude * FLOAT16_HEADROOM <= FLOAT16_MAX

    def refusal(self) -> str:
        return (f"COMPUTE_DTYPE=float16 would overflow this model: {self.module} reaches |x| = {self.magnitude:,.0f} "
                f"on a plain text, and float16 holds at most {FLOAT16_MAX:,.0f} (with {FLOAT16_HEADROOM:g}x headroom: "
                f"{FLOAT16_MAX / FLOAT16_HEADROOM:,.0f}); use bfloat16 or float32")


@torch.inference_mode()
def probe(model: torch.nn.Module, tokenizer) -> Probe:
    """The largest activation of the model (loaded in a dtype with float32's range) over PROBE_TEXT."""
    largest: dict = {"module": "", "magnitude": 0.0}

    def watch(name):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel():
                magnitude = float(tensor.detach().abs().float().nan_to_num(posinf=float("inf")).max())
                if magnitude > largest["magnitude"]:
                    largest.update(module=name, magnitude=magnitude)
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules() if name]
    try:
        ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids.to(model.device)
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return Probe(largest["module"], largest["magnitude"])
