"""PEFT's other soft-prompt kinds, imported and served beside prompt tuning, checked against PEFT.

P_TUNING, MULTITASK_PROMPT_TUNING and PREFIX_TUNING adapters are made and trained by PEFT itself,
uploaded as PEFT saved them, served in one batch with a prompt-tuning adapter (first-step logits equal PEFT's,
greedy output equal to the no-cache reference), and download as the very files uploaded.
"""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from peft import (
    MultitaskPromptTuningConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from app.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from app.engine.generation import first_step_logits
from app.engine.reference import reference_greedy_decode
from app.engine.requests import GenerationRequest
from tests.conftest import random_soft_prompt, upload_adapter
from tests.test_peft_interop import (
    FP32,
    PROMPTS,
    download,
    peft_logits,
    upload_peft_folder,
)

TASKS = 3


def trained_with_peft(model_dir: Path, folder: Path, config) -> PeftModel:
    """A PEFT model of `config`'s kind, trained a few steps (so every part moved), then saved."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    task = {"task_ids": torch.tensor([1])} if isinstance(config, MultitaskPromptTuningConfig) else {}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        model(input_ids=ids, labels=ids, **task).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture
def kinds(tiny_model_dir, tmp_path):
    """(PEFT model, saved folder, task kwargs for PEFT, form fields for the upload) per kind."""
    p_tuning = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32)
    multitask = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, num_tasks=TASKS, num_ranks=2)
    # with PEFT's reparameterization: it saves the MLP's output, the keys and values served
    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, prefix_projection=True, encoder_hidden_size=16)
    return {
        "P_TUNING": (trained_with_peft(tiny_model_dir, tmp_path / "pt", p_tuning), tmp_path / "pt", {}, {}),
        "MULTITASK_PROMPT_TUNING": (trained_with_peft(tiny_model_dir, tmp_path / "mpt", multitask), tmp_path / "mpt",
                                    {"task_ids": torch.tensor([1])}, {"task_id": "1"}),
        "PREFIX_TUNING": (trained_with_peft(tiny_model_dir, tmp_path / "prefix", prefix), tmp_path / "prefix", {}, {}),
    }


def test_every_kind_serves_peft_logits_side_by_side_and_downloads_as_uploaded(make_client, tiny_base, kinds):
    client = make_client(tiny_base)
    plain = random_soft_prompt(tiny_base, 4, seed=3)
    ids = {"PROMPT_TUNING": upload_adapter(client, plain)["id"]}
    for kind, (_, folder, _, form) in kinds.items():
        response = upload_peft_folder(client, folder, kind.lower(), **form)
        assert response.status_code == 201, response.text
        ids[kind] = response.json()["id"]
    runtime = client.app.state.runtime
    prompt_ids = [tiny_base.tokenizer(p).input_ids for p in PROMPTS]
    soft = {kind: client.portal.call(runtime.adapter_resolver.soft_prompt, adapter_id)[0] for kind, adapter_id in ids.items()}

    # One batch mixes the four kinds, each row with its own prompt.
    requests = [GenerationRequest(p, soft[kind], max_new_tokens=1) for kind in ids for p in prompt_ids]
    logits = iter(first_step_logits(tiny_base, requests))
    for kind in ids:
        for p in prompt_ids:
            served = next(logits)
            if kind == "PROMPT_TUNING":
                expected = first_step_logits(tiny_base, [GenerationRequest(p, plain, max_new_tokens=1)])[0]
            else:
                model, _, task, _ = kinds[kind]
                expected = peft_logits(model, p, **task)
            torch.testing.assert_close(served, expected, **FP32)

    for kind in kinds:
        response = client.post("/generate", json={"adapter_id": ids[kind], "prompt": PROMPTS[0], "max_new_tokens": 8})
        assert response.status_code == 200, response.text
        expected = reference_greedy_decode(tiny_base, soft[kind], prompt_ids[0], 8)
        assert response.json()["text"] == tiny_base.tokenizer.decode(expected, skip_special_tokens=True)

        zipped = client.get(f"/adapters/{ids[kind]}/download")
        assert zipped.status_code == 200
        folder = kinds[kind][1]
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
            assert {n: archive.read(n) for n in archive.namelist()} == {
                name: (folder / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def test_each_task_of_a_multitask_adapter_is_its_own_prompt(make_client, tiny_base, kinds, tiny_model_dir):
    client = make_client(tiny_base)
    model, folder, _, _ = kinds["MULTITASK_PROMPT_TUNING"]
    served = {}
    for task in (0, 2):
        response = upload_peft_folder(client, folder, f"task-{task}", task_id=str(task))
        assert response.status_code == 201, response.text
        served[task] = response.json()
        soft, _ = client.portal.call(client.app.state.runtime.adapter_resolver.soft_prompt, served[task]["id"])
        ids = tiny_base.tokenizer(PROMPTS[0]).input_ids
        logits = first_step_logits(tiny_base, [GenerationRequest(ids, soft, max_new_tokens=1)])[0]
        torch.testing.assert_close(logits, peft_logits(model, ids, task_ids=torch.tensor([task])), **FP32)
    assert served[0]["sha256"] != served[2]["sha256"]  # two prompts, two cache keys
    # The download loads in PEFT again.
    downloaded = download(client, served[2]["id"], folder.parent / "downloaded")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), downloaded)


def test_bad_task_ids_are_refused_by_name(make_client, tiny_base, kinds):
    client = make_client(tiny_base)
    folder = kinds["MULTITASK_PROMPT_TUNING"][1]
    response = upload_peft_folder(client, folder, "too-far", task_id=str(TASKS))
    assert response.status_code == 422 and f"task_id must be in 0..{TASKS - 1}" in response.text
    response = upload_peft_folder(client, kinds["P_TUNING"][1], "not-multitask", task_id="0")
    assert response.status_code == 422 and "task_id applies to MULTITASK_PROMPT_TUNING adapters only" in response.text
    assert client.get("/adapters").json()["total"] == 0


def test_a_prefix_made_for_another_model_shape_is_refused_by_name(make_client, tiny_base, kinds, tmp_path):
    client = make_client(tiny_base)
    folder = kinds["PREFIX_TUNING"][1]
    config = json.loads((folder / CONFIG_NAME).read_text())
    layers = tiny_base.kv_shape.layers
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config | {"num_layers": layers + 1}))
    (tmp_path / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
    response = upload_peft_folder(client, tmp_path, "other-shape")
    assert response.status_code == 422 and f"num_layers is {layers + 1}; this base model's prefix needs {layers}" in response.text
    assert client.get("/adapters").json()["total"] == 0
