"""Choose each row's next token from its logits, for all rows of a step at once.

Greedy rows take the argmax. Sampled rows are scaled by their temperature after subtracting
their maximum, so every value is <= 0 and no temperature, however small, can overflow into NaN;
top-p keeps the smallest set of likeliest tokens whose mass reaches `top_p`. Each sampled row
draws its uniform number from its own generator (seeded per request), so a seeded request
gives the same tokens whatever else shares its step.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.engine import transfers
from app.engine.transfers import StepInputs

_SMALLEST_TEMPERATURE = torch.finfo(torch.float32).tiny


@dataclass
class RowSampling:
    temperature: float
    top_p: float
    generator: torch.Generator | None  # None: greedy

    @classmethod
    def create(cls, temperature: float, top_p: float, seed: int | None, device: torch.device) -> "RowSampling":
        if temperature <= 0:
            return cls(0.0, 1.0, None)
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return cls(temperature, top_p, generator)


def _draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from unnormalised `probs` [R, V] with one uniform number per row."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    # uniform < 1, but uniform * total may round up to total: stay below it
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def greedy_tokens(logits: torch.Tensor, width: int = 4096) -> torch.Tensor:
    """`logits.argmax(-1)`, the very same indices (the first of equal maxima; a NaN counts as the
    largest), found through the maximum of each `width`-wide slice: torch's argmax does not
    vectorise and amax does, which matters over a 262k vocabulary (figures: bench/README.md)."""
    rows, vocab = logits.shape
    whole = vocab - vocab % width
    maxima = logits[:, :whole].view(rows, -1, width).amax(-1)
    if whole < vocab:
        maxima = torch.cat([maxima, logits[:, whole:].amax(-1, keepdim=True)], 1)
    starts = maxima.argmax(-1) * width  # the first slice that holds the row's maximum
    # The last slice may be short: clamped indices repeat the last logit after itself, harmlessly.
    slices = logits.gather(1, (starts[:, None] + torch.arange(width, device=logits.device)).clamp_(max=vocab - 1))
    return starts + slices.argmax(-1)


@dataclass
class SamplingParams:
    """A step's sampling inputs on the device, sent with the step's other inputs (app.engine.transfers)."""

    sampled: torch.Tensor  # [S] the logits rows drawn from; the others are greedy
    temperature: torch.Tensor  # [S]
    nucleus: torch.Tensor  # [N] positions in `sampled` of the rows with top_p < 1
    top_p: torch.Tensor  # [N]
    draws: list[int]  # `sampled` on the host: whose generators draw

    @classmethod
    def add_to(cls, inputs: StepInputs, rows: list[RowSampling]) -> Callable[[], "SamplingParams"]:
        """Put the rows' parameters in the step's inputs; the returned call reads them once sent."""
        draws = [i for i, row in enumerate(rows) if row.generator is not None]
        nucleus = [j for j, i in enumerate(draws) if rows[i].top_p < 1.0]
        sampled, temperature = inputs.ints(draws), inputs.floats([rows[i].temperature for i in draws])
        nucleus_at, top_p = inputs.ints(nucleus), inputs.floats([rows[draws[j]].top_p for j in nucleus])
        return lambda: cls(sampled.tensor, temperature.tensor.float(), nucleus_at.tensor, top_p.tensor.float(), draws)

    @classmethod
    def of(cls, rows: list[RowSampling], device: torch.device) -> "SamplingParams":
        """The rows' parameters on the device, sent on their own (outside an engine step)."""
        inputs = StepInputs()
        params = cls.add_to(inputs, rows)
        inputs.send(device)
        return params()


def sample(logits: torch.Tensor, rows: list[RowSampling], params: SamplingParams | None = None
           ) -> tuple[list[int], list[bool]]:
    """(next token of each row, whether its logits were usable). logits: [R, V] float32. Every
    row at once, top-p included; the results come back in one copy."""
    params = params or SamplingParams.of(rows, logits.device)
    tokens = greedy_tokens(logits)  # NaN counts as the largest value, so a NaN row picks one
    if params.draws:
        index = params.sampled
        chosen = logits[index]
        maxima = chosen.gather(1, tokens[index, None])
        scaled = (chosen - maxima) / params.temperature.clamp(min=_SMALLEST_TEMPERATURE)[:, None]
        probs = scaled.exp_().nan_to_num_(0.0)  # a row of NaNs is caught below, not drawn from
        uniform = torch.cat([torch.rand(1, generator=rows[i].generator, device=logits.device) for i in params.draws])
        choice = _draw(probs, uniform)
        if params.nucleus.numel():
            choice[params.nucleus] = _draw_top_p(probs[params.nucleus], uniform[params.nucleus], params.top_p)
        tokens[index] = torch.where(torch.isfinite(maxima[:, 0]), choice, tokens[index])
    # A row is usable when its largest logit is finite (with a NaN anywhere, argmax points at one).
    usable = torch.isfinite(logits.gather(1, tokens[:, None])[:, 0])
    tokens_out, usable_out = transfers.to_host(torch.stack([tokens, usable.long()]))
    return tokens_out, [bool(ok) for ok in usable_out]


def _draw_top_p(probs: torch.Tensor, uniform: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's draw from the smallest set of its likeliest tokens whose mass reaches its top_p
    (always at least one token); all rows at once."""
    ordered, order = probs.sort(dim=-1, descending=True)
    mass = ordered.cumsum(-1)
    ordered[mass - ordered >= top_p[:, None] * mass[:, -1:]] = 0.0
    return order.gather(1, _draw(ordered, uniform)[:, None])[:, 0]
