"""The model runner: the resident model as the engine drives it, one forward pass per step.

Pure tensors in, logits out. Every step is ONE flat sequence `[1, T]` of new tokens from any
number of rows; `attention.py` keeps each row's queries to its own cached keys. The model's own
code runs unchanged (embeddings, positions, norms, LM head and final logit processing), so any
transformers causal LM that uses the attention interface is served the same way.
"""

import torch

from app.engine import attention
from app.engine.loader import BaseModel


class ModelRunner:
    def __init__(self, base: BaseModel):
        attention.install(base.model)
        self.base = base
        self.device = base.device
        self._embed = base.model.get_input_embeddings()
        config = base.model.config.get_text_config()
        self.vocab_size = config.vocab_size

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, hidden]: the space soft prompts live in (Gemma's scaling included)."""
        return self._embed(token_ids)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, step: attention.StepAttention, logits_at: torch.Tensor
    ) -> torch.Tensor:
        """Run the model over the step's tokens; return float32 logits [len(logits_at), vocab]
        at the flat positions `logits_at` only (the LM head is the largest matmul per token)."""
        with attention.engine_step(step):
            out = self.base.model(
                inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False, logits_to_keep=logits_at
            )
        return out.logits[0].float()
