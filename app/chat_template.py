"""How a chat (OpenAI's `messages`) becomes the text and tokens a base model sees, for
/v1/chat/completions and for training on chat datasets alike, so that a tuned adapter answers in
chat exactly as it was trained.

A base model whose tokenizer carries a chat template (SmolLM2 135M Instruct: ChatML) is given its
own. One without (the default Gemma 3 270M: its GGUF has none, so the converted tokenizer has
none either; the tiny test models) gets this plain template, each message followed by a blank
line, the assistant's turn ending in the tokenizer's end-of-sequence token:

    System: {system content}

    User: {user content}

    Assistant: {assistant content}<eos>

    User: {user content}

    Assistant:

Roles: `system`, `developer` (the same as system), `user` and `assistant`. A message's content is
a string, or a list of text parts joined with newlines.
"""

from collections.abc import Mapping, Sequence

ROLES = ("system", "developer", "user", "assistant")

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

Message = Mapping[str, str]  # {"role": one of ROLES, "content": text}


class TemplateMismatch(ValueError):
    """The template renders a turn in a way that does not extend what came before it, so no one
    sequence of tokens can hold the conversation as the route would send each of its prompts."""


def canonical_role(role: str) -> str:
    """OpenAI's `developer` messages are what older models call `system`."""
    return "system" if role == "developer" else role


def text_of(parts: Sequence[str]) -> str:
    """A content given as text parts, as one string."""
    return "\n".join(parts)


def _uses_own_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The conversation as text: the tokenizer's own template, or PLAIN_TEMPLATE. Raises
    jinja2's TemplateError where the template refuses the conversation (some refuse roles out of
    turn)."""
    messages = [{"role": canonical_role(m["role"]), "content": m["content"]} for m in messages]
    template = None if _uses_own_template(tokenizer) else PLAIN_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text. A model's own template writes its special tokens (BOS
    included) into the text, as transformers' apply_chat_template(tokenize=True) assumes; the plain
    template leaves them to the tokenizer, as a completion prompt does."""
    return tokenizer(text, add_special_tokens=not _uses_own_template(tokenizer)).input_ids


def prompt_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """What /v1/chat/completions sends the model: the conversation, then the assistant's cue."""
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def encode_conversation(tokenizer, messages: Sequence[Message], trained: Sequence[bool],
                        stop_ids: set[int]) -> tuple[list[int], list[bool]]:
    """One training sequence for a conversation: token ids up to its last trained assistant turn,
    and for each id whether the loss covers it. `trained[k]` says whether message k is an
    assistant turn to learn. Before each assistant turn the ids are exactly `prompt_ids` of the
    messages before it (what the route sends); the turn's own ids are those the full rendering
    adds after them, up to and including the first of `stop_ids` (what ends a reply; anything the
    template adds after it is never generated, so not learnt). Raises TemplateMismatch where the
    template's renderings do not extend one another."""
    ids: list[int] = []
    mask: list[bool] = []
    for k, learn in enumerate(trained):
        if not learn:
            continue
        context = prompt_ids(tokenizer, messages[:k])
        whole = encode(tokenizer, render(tokenizer, messages[: k + 1], add_generation_prompt=False))
        if context[: len(ids)] != ids or whole[: len(context)] != context:
            raise TemplateMismatch(f"message {k + 1}: the chat template's rendering of it does not extend the "
                                   "conversation before it")
        reply = whole[len(context):]
        end = next((i + 1 for i, token in enumerate(reply) if token in stop_ids), len(reply))
        mask += [False] * (len(context) - len(ids)) + [True] * end
        ids = context + reply[:end]
    return ids, mask
