"""Training on chats: the loss covers exactly the assistant turns learnt, the text before each
is exactly what /v1/chat/completions sends, evaluation asks for the last turn's reply, and a chat
job's adapter is served by the chat route."""

import pytest
import torch
import torch.nn.functional as F

from app import chat_template, jobs
from app.adapter_files import read_served
from app.datasets import ChatExample, ChatMessage, Example, to_jsonl
from app.db import make_engine, make_session_factory
from app.engine.reference import reference_greedy_decode
from app.engine.requests import GenerationResult
from app.storage import adapter_key, dataset_key, make_storage
from app.train_config import TrainConfig
from tests.conftest import make_settings
from worker.job_runner import run_job
from worker.training import (
    Hooks,
    Row,
    VirtualTokens,
    encode_chat,
    exact_match_accuracy,
    target_losses,
    train_adapter,
)


def example(*turns) -> ChatExample:
    """A chat of (role, content[, weight]) turns or messages."""
    return ChatExample(tuple(turn if isinstance(turn, ChatMessage) else ChatMessage(*turn) for turn in turns))


CHAT = example(("system", "Answer in one word."), ("user", "a gripping , funny film"), ("assistant", "positive", 0),
               ("user", "the plot is a mess"), ("assistant", "negative"))
BOTH = example(*CHAT.messages[:2], ("assistant", "positive"), *CHAT.messages[3:])


def as_dicts(chat: ChatExample, end: int | None = None) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in chat.messages[:end]]


def scored_runs(row: Row) -> list[tuple[int, int]]:
    """(start, end) of each stretch of scored tokens."""
    runs, start = [], None
    for i, scored in enumerate([*row.scored, False]):
        if scored and start is None:
            start = i
        elif not scored and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("chat, learnt", [(CHAT, [4]), (BOTH, [2, 4])])
def test_the_loss_mask_covers_exactly_the_assistant_turns_learnt(tiny_base, chat, learnt):
    tokenizer = tiny_base.tokenizer
    row = encode_chat(tiny_base, chat, max_length=512)
    runs = scored_runs(row)
    # Each turn learnt: its content and the end-of-sequence token that ends the reply, nothing else.
    assert [tokenizer.decode(row.ids[a:b]) for a, b in runs] == [f" {chat.messages[k].content}<eos>" for k in learnt]
    # What comes before each is exactly what the chat route sends for the messages before it.
    for (start, _), k in zip(runs, learnt):
        assert row.ids[:start] == chat_template.prompt_ids(tokenizer, as_dicts(chat, k))
    assert row.ids[-1] == tokenizer.eos_token_id  # nothing after the last turn learnt


def test_the_loss_is_the_cross_entropy_of_the_masked_tokens(tiny_base):
    prompt = torch.randn(4, tiny_base.hidden_size) * 0.3
    rows = [encode_chat(tiny_base, chat, 512) for chat in (CHAT, BOTH)]
    got = target_losses(tiny_base, VirtualTokens("prompt_tuning", prompt), rows)
    embed = tiny_base.model.get_input_embeddings()
    expected = []
    for row in rows:  # full logits, one row at a time, labels masked by hand
        ids = torch.tensor(row.ids)
        logits = tiny_base.model(inputs_embeds=torch.cat([prompt, embed(ids)])[None]).logits[0]
        labels = torch.where(torch.tensor(row.scored), ids, -100)
        expected.append(F.cross_entropy(logits[3:-1], labels, reduction="none")[labels != -100])
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_a_long_chat_keeps_bos_and_its_end(tiny_base):
    chat = example(("user", "word " * 300), ("assistant", "positive"))
    row = encode_chat(tiny_base, chat, max_length=32)
    whole = encode_chat(tiny_base, chat, max_length=10_000)
    assert len(row.ids) == 32 and row.ids[0] == tiny_base.tokenizer.bos_token_id
    assert row.ids[1:] == whole.ids[-31:] and row.scored[1:] == whole.scored[-31:]


class AnsweringDevice:
    """A serving node as evaluation sees it, whose engine answers each request with the next of
    `replies` (a random tiny model never ends a reply by itself) and notes what it was asked."""

    step_budget_s = None
    last_longest_piece_s = 0.0
    serves = True

    def __init__(self, replies: list[str]):
        self.replies, self.requests = replies, []

    def run_training_work(self, work):
        return work()

    def generate(self, requests: list, timeout: float = 0.0) -> list:
        self.requests += requests
        return [GenerationResult(text=self.replies.pop(0)) for _ in requests]


def test_accuracy_asks_for_the_reply_to_the_messages_before_the_last_turn_learnt(tiny_base):
    device = AnsweringDevice([" negative", "positive"])
    assert exact_match_accuracy(tiny_base, None, [CHAT, BOTH], "{input}", 512, device) == 0.5
    targets = [scored_runs(encode_chat(tiny_base, chat, 512))[-1] for chat in (CHAT, BOTH)]
    for request, chat in zip(device.requests, (CHAT, BOTH)):
        assert request.prompt_ids == chat_template.prompt_ids(tiny_base.tokenizer, as_dicts(chat, 4))
        assert request.stop == [] and request.max_new_tokens == max(b - a for a, b in targets)  # the reply, whole


def test_training_on_chats_lowers_their_loss(tiny_base):
    chats = [example(("user", f"review number {i}"), ("assistant", ["negative", "positive"][i % 2])) for i in range(16)]
    config = TrainConfig(num_virtual_tokens=4, max_steps=20, eval_every=10, batch_size=8, learning_rate=0.3)
    evals = []
    result = train_adapter(tiny_base, config, chats, chats[:8], Hooks(on_eval=lambda *e: evals.append(e)))
    assert [step for step, _, _ in evals] == [10, 20] and evals[-1][1] < evals[0][1]
    assert result.eval_examples == 8 and 0 <= result.eval_accuracy <= 1


def test_training_and_validation_data_must_share_a_format(tiny_base):
    with pytest.raises(ValueError, match="different formats"):
        train_adapter(tiny_base, TrainConfig(max_steps=1), [CHAT], [Example("a", "b")])


@pytest.mark.real_model
def test_smollm2s_own_template_masks_its_assistant_turns(second_real_base):
    tokenizer = second_real_base.tokenizer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template  # its own: ChatML
    row = encode_chat(second_real_base, BOTH, max_length=512)
    runs = scored_runs(row)
    assert [tokenizer.decode(row.ids[a:b]) for a, b in runs] == ["positive<|im_end|>", "negative<|im_end|>"]
    for (start, _), k in zip(runs, [2, 4]):
        assert row.ids[:start] == chat_template.prompt_ids(tokenizer, as_dicts(BOTH, k))
        assert tokenizer.decode(row.ids[:start]).endswith("<|im_start|>assistant\n")


def test_a_chat_job_makes_an_adapter_the_chat_route_serves(tmp_path, sqlite_url, tiny_base, make_client):
    settings = make_settings(tmp_path, sqlite_url)
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    chats = [example(("user", f"review number {i}"), ("assistant", ["negative", "positive"][i % 2])) for i in range(8)]
    params = TrainConfig(num_virtual_tokens=4, max_steps=4, eval_every=2, batch_size=4).to_dict()
    storage, key = make_storage(settings, sessions), dataset_key("chatjob")
    with sessions() as session, storage.storing(session, key, {"train.jsonl": to_jsonl(chats)}):
        jobs.create_job(session, job_id="chatjob", name="chat", params=params, dataset_path=key, train_examples=8,
                        validation_examples=0)
    assert run_job("chatjob", settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    with sessions() as session:
        adapter_id = jobs.get_job(session, "chatjob").adapter_id
    prompt = read_served(storage.read_all(adapter_key(adapter_id)))[0]
    messages = as_dicts(chats[0], 1)
    response = make_client(tiny_base).post("/v1/chat/completions", json={
        "model": adapter_id, "messages": messages, "max_completion_tokens": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    ids = chat_template.prompt_ids(tiny_base.tokenizer, messages)
    expected = tiny_base.tokenizer.decode(reference_greedy_decode(tiny_base, prompt, ids, 5), skip_special_tokens=True)
    assert response.json()["choices"][0]["message"]["content"] == expected
    engine.dispose()
