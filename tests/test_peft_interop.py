"""PEFT interoperability in both directions, checked against the real Hugging Face PEFT library.

softserve -> PEFT: an adapter downloaded from softserve loads with `PeftModel.from_pretrained`,
and PEFT computes the same next-token logits that softserve samples its first token from.
PEFT -> softserve: an adapter trained and saved by PEFT uploads (two files, or one zip), softserve
serves the same logits, and `POST /generate` decodes exactly as the greedy reference.

softserve computes the prompts in one engine step (one flat sequence, each row attending to its
own cached keys). PEFT's logits for each row come from that row alone.
"""

import io
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from app.engine.generation import first_step_logits
from app.engine.reference import reference_greedy_decode
from app.engine.requests import GenerationRequest
from tests.conftest import random_soft_prompt, upload_adapter

PROMPTS = ["a gripping , funny film with a great cast", "Hello"]  # different lengths: row 2 is left-padded
FP32 = {"atol": 1e-4, "rtol": 1e-4}


def peft_logits(peft_model: PeftModel, prompt_ids: list[int], **task) -> torch.Tensor:
    """PEFT's next-token logits for one unpadded row; PEFT prepends the virtual tokens itself.
    `task`: `task_ids` for a multitask adapter."""
    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = peft_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False, **task)
    return out.logits[0, -1].float()


def served_logits(client, adapter_id: str) -> torch.Tensor:
    """softserve's first-step logits for PROMPTS in one batch, with the soft prompt the app serves."""
    runtime = client.app.state.runtime
    soft_prompt, _ = client.portal.call(runtime.adapter_resolver.soft_prompt, adapter_id)
    ids = [runtime.base.tokenizer(p).input_ids for p in PROMPTS]
    return first_step_logits(runtime.base, [GenerationRequest(i, soft_prompt, max_new_tokens=1) for i in ids])


def assert_serves_peft_logits(client, adapter_id: str, peft_model: PeftModel, **tolerance) -> None:
    """softserve's first-step logits equal PEFT's for each prompt, and pick the same token."""
    served = served_logits(client, adapter_id)
    for row, prompt in enumerate(PROMPTS):
        expected = peft_logits(peft_model, client.app.state.runtime.base.tokenizer(prompt).input_ids)
        torch.testing.assert_close(served[row], expected, **tolerance)
        assert served[row].argmax() == expected.argmax()


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Distance between the next-token distributions two logit vectors give (0 same, 1 disjoint)."""
    return 0.5 * float((a.softmax(-1) - b.softmax(-1)).abs().sum())


def upload_peft_folder(client, folder: Path, name: str, **form):
    """POST /adapters with the two files PEFT's save_pretrained wrote in `folder`."""
    files = {"config": (CONFIG_NAME, (folder / CONFIG_NAME).read_bytes()),
             "weights": (WEIGHTS_NAME, (folder / WEIGHTS_NAME).read_bytes())}
    return client.post("/adapters", data={"name": name, **form}, files=files)


def download(client, adapter_id: str, folder: Path) -> Path:
    response = client.get(f"/adapters/{adapter_id}/download")
    assert response.status_code == 200, response.text
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(folder)
    return folder


def test_adapter_downloaded_from_softserve_gives_the_same_logits_in_peft(
    make_client, tiny_base, tiny_model_dir, tmp_path
):
    client = make_client(tiny_base)
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 6, seed=5))["id"]
    folder = download(client, adapter_id, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    assert_serves_peft_logits(client, adapter_id, peft_model, **FP32)


def train_with_peft(model_dir: Path, folder: Path, num_virtual_tokens: int = 5, steps: int = 8) -> PeftModel:
    """Prompt-tune a fresh copy of the model with PEFT on two examples, then save_pretrained."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # PEFT draws the initial prompt from the global generator
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
    )
    examples = ["a charming film\nSentiment: positive", "a dull mess\nSentiment: negative"]
    batch = tokenizer(examples, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it really trained: the embeddings moved away from their init
    model.save_pretrained(folder)
    return model.eval()


def test_adapter_trained_with_peft_uploads_and_serves_the_same_logits(make_client, tiny_base, tiny_model_dir, tmp_path):
    folder = tmp_path / "peft-adapter"
    peft_model = train_with_peft(tiny_model_dir, folder)
    client = make_client(tiny_base)
    response = upload_peft_folder(client, folder, "peft-trained")
    assert response.status_code == 201, response.text
    adapter = response.json()
    assert adapter["num_virtual_tokens"] == 5

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            z.write(folder / name, arcname=name)
    zipped = client.post("/adapters", data={"name": "zip"}, files={"archive": ("adapter.zip", archive.getvalue())})
    assert zipped.status_code == 201, zipped.text
    assert zipped.json()["sha256"] == adapter["sha256"]

    assert_serves_peft_logits(client, adapter["id"], peft_model, **FP32)
    response = client.post("/generate", json={"adapter_id": adapter["id"], "prompt": PROMPTS[0], "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    trained = peft_model.get_prompt_embedding_to_save("default")
    expected = reference_greedy_decode(tiny_base, trained, tiny_base.tokenizer(PROMPTS[0]).input_ids, 8)
    assert response.json()["text"] == tiny_base.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.real_model
def test_real_model_adapter_from_softserve_gives_the_same_logits_in_peft(make_client, real_base, tmp_path):
    client = make_client(real_base)
    adapter_id = upload_adapter(client, random_soft_prompt(real_base, 8, seed=7))["id"]
    other_id = upload_adapter(client, random_soft_prompt(real_base, 8, seed=8))["id"]
    probe = torch.tensor([real_base.tokenizer(PROMPTS[0]).input_ids])
    with torch.inference_mode():
        before = real_base.model(input_ids=probe, use_cache=False).logits
    # Wrap the very int8 module softserve runs, so both compute with the same quantized weights.
    peft_model = PeftModel.from_pretrained(real_base.model, download(client, adapter_id, tmp_path / "adapter"))
    # The engine's paged attention may sum in another order than PEFT's full forward, and a
    # few-ulp change that flips the int8 rounding of an activation moves int8 logits by up to ~1.3.
    # So compare next-token distributions (total variation): measured 0 to 3e-7 with torch's fused
    # attention in both, up to 0.04 with a hand-written one; another adapter's soft prompt gives
    # 0.086-0.134, and a prompt shifted by one position far more.
    served, other = served_logits(client, adapter_id), served_logits(client, other_id)
    for row, prompt in enumerate(PROMPTS):
        expected = peft_logits(peft_model, real_base.tokenizer(prompt).input_ids)
        assert served[row].argmax() == expected.argmax()
        assert total_variation(served[row], expected) < 0.04
        assert total_variation(other[row], expected) > 0.06  # the check tells adapters apart
    # Prompt tuning injects no layers: the shared session model still computes exactly as before.
    with torch.inference_mode():
        assert torch.equal(real_base.model(input_ids=probe, use_cache=False).logits, before)
