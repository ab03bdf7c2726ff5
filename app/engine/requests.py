"""What a generation request and its result are.

Each row's input is `[soft prompt ; prompt tokens]`, and rows with different adapters share every
forward pass. We inject soft prompts ourselves instead of calling `PeftModel.generate()`, whose
cached path with prompt tuning gives wrong tokens after the first one on current peft/transformers.
"""

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import cast

import torch

from app.engine.loader import BaseModel


@dataclass(frozen=True, eq=False)
class SoftPrompt:
    """What an adapter puts at positions 0..n-1, and what identifies its content: the prefix KV
    cache is keyed by adapter id AND digest, never by id alone. Either input embeddings
    [n, hidden] (prompt tuning and the kinds that reduce to it), or, for prefix tuning, each
    layer's keys and values `prefix_kv` [layers, 2, n, kv_heads, head_dim], which the engine
    writes straight into the KV cache."""

    embeddings: torch.Tensor | None
    adapter_id: str = ""
    digest: str = ""
    prefix_kv: torch.Tensor | None = None

    def __post_init__(self):
        if (self.embeddings is None) == (self.prefix_kv is None):
            raise ValueError("a soft prompt has either embeddings or prefix_kv")
        if not self.digest:
            values = self.values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            object.__setattr__(self, "digest", hashlib.sha256(values).hexdigest())

    @classmethod
    def prefix(cls, prefix_kv: torch.Tensor, adapter_id: str = "", digest: str = "") -> "SoftPrompt":
        return cls(None, adapter_id, digest, prefix_kv)

    @property
    def values(self) -> torch.Tensor:
        return cast(torch.Tensor, self.embeddings if self.prefix_kv is None else self.prefix_kv)  # one is set

    def to(self, device, dtype: torch.dtype) -> "SoftPrompt":
        moved = self.values.to(device, dtype)
        if self.prefix_kv is None:
            return SoftPrompt(moved, self.adapter_id, self.digest)
        return SoftPrompt.prefix(moved, self.adapter_id, self.digest)

    def __len__(self) -> int:
        return self.values.shape[0] if self.prefix_kv is None else self.prefix_kv.shape[2]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    soft_prompt: SoftPrompt | None  # a bare tensor is taken as an unnamed adapter's; None: the base model
    max_new_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    # Set from another thread (the client left): the row leaves the engine at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        if isinstance(self.soft_prompt, torch.Tensor):
            self.soft_prompt = SoftPrompt(self.soft_prompt)

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.soft_prompt is None else len(self.soft_prompt)


class FinishReason(StrEnum):
    """Why a row finished; "stop" and "length" reach clients as OpenAI's finish_reason."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the client left


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = FinishReason.LENGTH
    prompt_tokens: int = 0


def stop_token_ids(base: BaseModel) -> set[int]:
    ids = {base.tokenizer.eos_token_id}
    configured = getattr(base.model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}

