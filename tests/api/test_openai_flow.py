"""Issue 25's "Done when", with the official `openai` client over real HTTP against nodes that serve
and train: the whole flow on the real default model (files -> job -> events -> checkpoints -> chat
and completions with the fine-tuned model and with a checkpoint, streamed and not); pause and
resume to the result of a run without the pause; a signed webhook on a real local listener."""

import base64
import time

import openai
import pytest
import torch

from app import jobs
from app.adapter_files import read_served
from app.main import create_app
from app.storage import adapter_key
from tests.conftest import LiveServer, make_settings
from tests.webhook_listener import Listener
from tests.worker.test_end_to_end import sst2_slice
from tests.worker.test_node_lifetime import wait_until
from worker.consumer import training_consumer

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
REVIEW = "a gorgeous, witty, seductive movie."


def training_node(tmp_path, sqlite_url, base, **overrides) -> LiveServer:
    """A node that serves and trains: uvicorn, the engine and the Celery consumer around `base`."""
    settings = make_settings(tmp_path, sqlite_url, **overrides)
    return LiveServer(create_app(settings, base=base, services=[training_consumer]))


def openai_client(node: LiveServer, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, **kwargs)


def upload(client: openai.OpenAI, tmp_path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    with (tmp_path / name).open("rb") as file:
        return client.files.create(file=file, purpose="fine-tune").id


def streamed_text(chunks, text_of) -> tuple[str, object]:
    """The text of a stream's chunks, and the usage its last chunk carries."""
    chunks = list(chunks)
    return "".join(text_of(chunk) or "" for chunk in chunks if chunk.choices), chunks[-1].usage


def chat_text(chunk) -> str | None:
    return chunk.choices[0].delta.content


def completion_text(chunk) -> str | None:
    return chunk.choices[0].text


def served_prompt(node: LiveServer, adapter_id: str) -> torch.Tensor:
    return read_served(node.runtime.storage.read_all(adapter_key(adapter_id)))[0]


@pytest.mark.real_model
def test_the_openai_client_tunes_the_real_model_and_chats_with_the_result_and_a_checkpoint(
        tmp_path, sqlite_url, real_base):
    with training_node(tmp_path, sqlite_url, real_base) as node:
        client = openai_client(node)
        training = upload(client, tmp_path, "train.jsonl", sst2_slice("train", 12))
        validation = upload(client, tmp_path, "valid.jsonl", sst2_slice("validation", 2))
        job = client.fine_tuning.jobs.create(
            model=real_base.name, training_file=training, validation_file=validation, suffix="sst2", seed=5,
            method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
            extra_body={"softserve": {"num_virtual_tokens": 4, "max_steps": 6, "eval_every": 2,
                                      "template": "Review: {input}\nSentiment:"}})
        assert job.status in ("queued", "running") and job.model == real_base.name
        wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"), "the job ends")
        done = client.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded" and done.error is None, done.error
        assert done.fine_tuned_model.startswith(f"ft:{real_base.name}:sst2:")

        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        metrics = [e for e in events if e.type == "metrics"]
        assert sorted(e.data["step"] for e in metrics if "train_loss" in e.data) == [1, 2, 3, 4, 5, 6]
        evaluations = [e.data for e in metrics if "valid_loss" in e.data]
        assert sorted(e["step"] for e in evaluations) == [2, 4, 6]
        assert all(e["valid_loss"] > 0 and 0 <= e["valid_mean_token_accuracy"] <= 1 for e in evaluations)
        assert events[-1].message == "queued"

        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert checkpoints and [c.step_number for c in checkpoints] == sorted(
            (c.step_number for c in checkpoints), reverse=True)
        checkpoint = checkpoints[-1]  # the first evaluation always improves on nothing: step 2
        assert checkpoint.step_number == 2 and checkpoint.fine_tuning_job_id == job.id
        assert checkpoint.fine_tuned_model_checkpoint.endswith(":ckpt-step-2")
        assert checkpoint.metrics.step == 2 and checkpoint.metrics.valid_loss > 0 and checkpoint.metrics.train_loss > 0

        message = [{"role": "user", "content": f"Is this review positive or negative? {REVIEW}"}]
        for model in (done.fine_tuned_model, checkpoint.fine_tuned_model_checkpoint):
            chat = client.chat.completions.create(model=model, messages=message, max_tokens=4, temperature=0)
            assert chat.model == model and chat.choices[0].message.role == "assistant"
            assert chat.choices[0].message.content.strip() and chat.usage.completion_tokens > 0
            streamed, usage = streamed_text(client.chat.completions.create(
                model=model, messages=message, max_tokens=4, temperature=0, stream=True,
                stream_options={"include_usage": True}), chat_text)
            # Not compared with the text above: a repeated greedy request on the int8 model has been
            # seen to answer otherwise after a few tokens.
            assert streamed.strip() and usage.prompt_tokens == chat.usage.prompt_tokens and usage.completion_tokens > 0

            prompt = f"Review: {REVIEW}\nSentiment:"
            completion = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
            assert completion.model == model and completion.choices[0].text.strip()
            assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
            streamed, usage = streamed_text(client.completions.create(
                model=model, prompt=prompt, max_tokens=3, temperature=0, stream=True,
                stream_options={"include_usage": True}), completion_text)
            assert streamed.strip() and usage.prompt_tokens == completion.usage.prompt_tokens and usage.completion_tokens > 0
        # The checkpoint is its own prompt, not the final one.
        final_id, checkpoint_id = done.fine_tuned_model.split(":")[3], checkpoint.fine_tuned_model_checkpoint.split(":")[3]
        assert final_id != checkpoint_id
        assert not torch.equal(served_prompt(node, final_id), served_prompt(node, checkpoint_id))


@pytest.fixture
def slow_steps(monkeypatch):
    """Steps of the tiny model take ~1 ms: slow them so that a pause lands mid-run."""
    record_step = jobs.record_step

    def slowly(*args, **kwargs):
        time.sleep(0.03)
        record_step(*args, **kwargs)

    monkeypatch.setattr(jobs, "record_step", slowly)


def test_the_openai_client_pauses_and_resumes_a_job_to_the_result_of_a_run_without_the_pause(
        tmp_path, sqlite_url, tiny_base, slow_steps):
    # A run notices a pause at its next heartbeat: beat often, or the job may end before it does
    # (the default 2 s outlasted the ~1.5 s left of this job in CI).
    with training_node(tmp_path, sqlite_url, tiny_base, heartbeat_interval_s=0.2) as node:
        client = openai_client(node)
        training = upload(client, tmp_path, "train.jsonl", sst2_slice("train", 30))
        validation = upload(client, tmp_path, "valid.jsonl", sst2_slice("validation", 4))

        def create():
            return client.fine_tuning.jobs.create(
                model=tiny_base.name, training_file=training, validation_file=validation, seed=11,
                method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 3}}},
                extra_body={"softserve": {"num_virtual_tokens": 4, "max_steps": 40, "eval_every": 7,
                                          "early_stopping_patience": 10, "template": "{input} =>"}})

        whole = create()
        wait_until(lambda: client.fine_tuning.jobs.retrieve(whole.id).status == "succeeded", "the whole run succeeds")
        paused = create()
        wait_until(lambda: client.fine_tuning.jobs.retrieve(paused.id).softserve["progress"]["step"] > 3,
                   "the second job is running", polls=600)
        asked = client.fine_tuning.jobs.pause(paused.id)
        assert asked.id == paused.id and asked.status in ("running", "paused")
        wait_until(lambda: client.fine_tuning.jobs.retrieve(paused.id).status == "paused", "the job pauses")
        at = client.fine_tuning.jobs.retrieve(paused.id).softserve["progress"]["step"]
        assert 3 < at < 40
        messages = [e.message for e in client.fine_tuning.jobs.list_events(paused.id, limit=200).data]
        assert messages[0] == f"paused at step {at}" and "pause requested" in messages
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.pause(paused.id)

        assert client.fine_tuning.jobs.resume(paused.id).status in ("queued", "running", "succeeded")
        wait_until(lambda: client.fine_tuning.jobs.retrieve(paused.id).status == "succeeded", "the resumed job succeeds")
        messages = [e.message for e in client.fine_tuning.jobs.list_events(paused.id, limit=200).data]
        assert {"resumed", f"going on from step {at}, as saved"} <= set(messages)
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.resume(paused.id)
        ends = [client.fine_tuning.jobs.retrieve(job.id) for job in (whole, paused)]
        # Same seed: the same final prompt, up to the float summation order of micro-batches sized by timing.
        torch.testing.assert_close(*(served_prompt(node, job.fine_tuned_model.split(":")[3]) for job in ends),
                                   atol=1e-5, rtol=0)
        steps = [[c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] for job in ends]
        assert steps[0] and steps[0] == steps[1]


def test_a_job_made_through_the_openai_route_calls_its_webhook_url_signed(tmp_path, sqlite_url, tiny_base):
    with Listener() as listener, training_node(tmp_path, sqlite_url, tiny_base, webhook_secret=SECRET,
                                               webhook_allowed_hosts="127.0.0.1") as node:
        client = openai_client(node, webhook_secret=SECRET)
        training = upload(client, tmp_path, "train.jsonl", sst2_slice("train", 8))
        job = client.fine_tuning.jobs.create(
            model=tiny_base.name, training_file=training, metadata={"webhook_url": listener.url},
            extra_body={"softserve": {"num_virtual_tokens": 2, "max_steps": 2}})
        wait_until(lambda: listener.received, "the webhook arrives", polls=300)
        [received] = listener.received
        event = client.webhooks.unwrap(received.body, received.headers)  # checks the signature and its age
        assert (event.type, event.data.id) == ("fine_tuning.job.succeeded", job.id)
        assert received.path == "/hooks/softserve?token=abc"
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(received.body + b" ", received.headers)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
        wait_until(lambda: any("delivered" in e.message for e in client.fine_tuning.jobs.list_events(job.id).data),
                   "the delivery shows on the job's events", polls=100)
