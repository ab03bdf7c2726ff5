"""What OpenAI routes accept as `model`: the base model's name, an adapter id, or a fine-tuned
model's name as the fine-tuning API reports it, "ft:<base name>:<suffix>:<adapter id>" (a
checkpoint's may carry more, ":ckpt-step-<n>": the fourth field is always the adapter's id). One
resolution, which every route that takes `model` uses (app.api.completion_service.model_soft_prompt)."""

FT_PREFIX = "ft"
DEFAULT_SUFFIX = "softserve"  # the suffix field of a job made without one


def fine_tuned_model(base_name: str, suffix: str | None, adapter_id: str) -> str:
    """The OpenAI name of an adapter a fine-tuning job made."""
    return f"{FT_PREFIX}:{base_name}:{suffix or DEFAULT_SUFFIX}:{adapter_id}"


def adapter_for_model(model: str, base_name: str) -> str | None:
    """The adapter `model` names; None when it names the base model. Anything else is taken as an
    adapter id (an unknown one is the adapter resolver's to refuse)."""
    if model == base_name:
        return None
    fields = model.split(":")
    if fields[0] == FT_PREFIX and len(fields) >= 4 and fields[3]:
        return fields[3]
    return model
