"""Adapter upload, validation, listing, download and delete through the real app."""

import io
import json
import zipfile

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from app import jobs
from app.storage import ADAPTERS
from tests.conftest import adapter_file_bytes, random_soft_prompt, upload_adapter


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def stored_state(client):
    """Every adapter row and stored key, to prove failed uploads leave nothing behind."""
    return client.get("/adapters").json()["total"], sorted(client.app.state.runtime.storage.keys(ADAPTERS))


def post_files(client, files, name="x"):
    return client.post("/adapters", data={"name": name}, files=files)


def test_upload_two_files_then_get_and_list(client, tiny_base):
    prompt = random_soft_prompt(tiny_base, 5, seed=1)
    created = upload_adapter(client, prompt, name="sentiment-v1")
    assert created["num_virtual_tokens"] == 5 and created["source"] == "imported"
    assert created["base_fingerprint"] == tiny_base.fingerprint
    assert len(created["id"]) == 12 and created["size_bytes"] > 5 * 64 * 4
    assert client.get(f"/adapters/{created['id']}").json() == created
    assert client.get("/adapters").json()["items"] == [created]


def test_upload_zip_and_download_round_trip(client, tiny_base):
    prompt = random_soft_prompt(tiny_base, 4, seed=2)
    config, weights = adapter_file_bytes(prompt)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("my-adapter/adapter_config.json", config)
        z.writestr("my-adapter/adapter_model.safetensors", weights)
    response = post_files(client, {"archive": ("a.zip", archive.getvalue())})
    assert response.status_code == 201, response.text
    adapter_id = response.json()["id"]

    download = client.get(f"/adapters/{adapter_id}/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as z:
        assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        got = load_safetensors(z.read("adapter_model.safetensors"))
        config_out = json.loads(z.read("adapter_config.json"))
    assert torch.equal(got["prompt_embeddings"], prompt)
    assert config_out["peft_type"] == "PROMPT_TUNING" and config_out["num_virtual_tokens"] == 4
    assert config_out["token_dim"] == 64 and config_out["task_type"] == "CAUSAL_LM"

    # The downloaded zip uploads again unchanged (a full PEFT-format round trip).
    again = post_files(client, {"archive": ("b.zip", download.content)})
    assert again.status_code == 201 and again.json()["sha256"] == response.json()["sha256"]


def test_downloaded_adapter_loads_in_hf_peft(client, tiny_base, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = random_soft_prompt(tiny_base, 6, seed=3)
    adapter_id = upload_adapter(client, prompt)["id"]
    with zipfile.ZipFile(io.BytesIO(client.get(f"/adapters/{adapter_id}/download").content)) as z:
        z.extractall(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert torch.allclose(peft_model.get_prompt_embedding_to_save("default"), prompt)


def valid_files(tiny_base, **overrides):
    config, weights = adapter_file_bytes(random_soft_prompt(tiny_base, 3, seed=4), **overrides)
    return {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}


def replace(files, key, content):
    return files | {key: (files[key][0], content)}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("config_not_json", "adapter_config.json: not valid UTF-8 JSON"),
        ("wrong_peft_type",
         "peft_type must be one of PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING, PREFIX_TUNING, got 'LORA'"),
        ("bad_virtual_tokens", "num_virtual_tokens must be an integer"),
        ("wrong_width", "token_dim 32 does not match the base model's 64"),
        ("pickle_weights", "not a valid safetensors file"),
        ("two_tensors", "a PROMPT_TUNING adapter holds exactly the tensors ['prompt_embeddings']"),
        ("int_dtype", "must be float16, bfloat16 or float32"),
        ("shape_mismatch", "has shape [3, 32], expected [3, 64]"),
        ("nan_values", "contains NaN or infinite values"),
        ("missing_weights", "weights: file is required"),
        ("bad_zip", "archive: not a valid zip file"),
        ("zip_missing_member", "archive: missing adapter_model.safetensors"),
        ("empty_file", "config: file is empty"),
    ],
)
def test_invalid_uploads_get_422_naming_the_problem_and_store_nothing(client, tiny_base, case, expected):
    files = valid_files(tiny_base)
    config = json.loads(files["config"][1])
    if case == "config_not_json":
        files = replace(files, "config", b"{not json")
    elif case == "wrong_peft_type":
        files = replace(files, "config", json.dumps(config | {"peft_type": "LORA"}).encode())
    elif case == "bad_virtual_tokens":
        files = replace(files, "config", json.dumps(config | {"num_virtual_tokens": 0}).encode())
    elif case == "wrong_width":
        files = replace(files, "config", json.dumps(config | {"token_dim": 32}).encode())
    elif case == "pickle_weights":
        buffer = io.BytesIO()
        torch.save({"prompt_embeddings": torch.zeros(3, 64)}, buffer)
        files = replace(files, "weights", buffer.getvalue())
    elif case == "two_tensors":
        files = replace(files, "weights", save({"prompt_embeddings": torch.zeros(3, 64), "extra": torch.zeros(1)}))
    elif case == "int_dtype":
        files = replace(files, "weights", save({"prompt_embeddings": torch.zeros(3, 64, dtype=torch.int32)}))
    elif case == "shape_mismatch":
        files = replace(files, "weights", save({"prompt_embeddings": torch.zeros(3, 32)}))
    elif case == "nan_values":
        bad = torch.zeros(3, 64)
        bad[1, 5] = float("nan")
        files = replace(files, "weights", save({"prompt_embeddings": bad}))
    elif case == "missing_weights":
        files = {"config": files["config"]}
    elif case == "bad_zip":
        files = {"archive": ("a.zip", b"PK not really")}
    elif case == "zip_missing_member":
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("adapter_config.json", files["config"][1])
        files = {"archive": ("a.zip", archive.getvalue())}
    elif case == "empty_file":
        files = replace(files, "config", b"")
    response = post_files(client, files)
    assert response.status_code == 422, response.text
    assert expected in json.dumps(response.json()["detail"])
    assert stored_state(client) == (0, [])


def test_adapter_for_another_base_model_gets_409(client, tiny_base):
    response = post_files(client, valid_files(tiny_base, fingerprint="other-model@0123456789abcdef") | {})
    assert response.status_code == 409
    assert "other-model@0123456789abcdef" in response.json()["detail"]
    assert stored_state(client) == (0, [])


def test_missing_name_gets_422_naming_the_field(client, tiny_base):
    response = client.post("/adapters", files=valid_files(tiny_base))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "name"]


@pytest.mark.parametrize(
    "rows, message",
    [
        (200, "weights: file is larger than 4096 bytes"),  # 51 kB: one file over its cap
        (1000, "request body is larger than the"),  # 256 kB: refused before the form is parsed
    ],
)
def test_oversize_upload_gets_413(make_client, tiny_base, rows, message):
    client = make_client(tiny_base, max_adapter_upload_bytes=4096)
    files = replace(valid_files(tiny_base), "weights", save({"prompt_embeddings": torch.zeros(rows, 64)}))
    response = post_files(client, files)
    assert response.status_code == 413
    assert message in response.json()["detail"]
    assert stored_state(client) == (0, [])


def test_list_paginates_and_filters_by_name(client, tiny_base):
    prompt = random_soft_prompt(tiny_base, 2, seed=5)
    for i in range(5):
        upload_adapter(client, prompt, name=f"sst2-run-{i}")
    upload_adapter(client, prompt, name="agnews_100%")
    page = client.get("/adapters", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 6 and len(page["items"]) == 2 and page["limit"] == 2 and page["offset"] == 1
    names = [a["name"] for a in client.get("/adapters", params={"limit": 100}).json()["items"]]
    assert names == ["agnews_100%"] + [f"sst2-run-{i}" for i in reversed(range(5))]  # newest first
    assert client.get("/adapters", params={"name": "SST2"}).json()["total"] == 5
    assert client.get("/adapters", params={"name": "_100%"}).json()["total"] == 1  # wildcards are literal
    assert client.get("/adapters", params={"name": "1%"}).json()["total"] == 0
    assert client.get("/adapters", params={"limit": 0}).status_code == 422


def test_delete_removes_row_files_and_serving(client, tiny_base):
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 3, seed=6))["id"]
    ok = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "a fine film", "max_new_tokens": 2})
    assert ok.status_code == 200
    assert client.delete(f"/adapters/{adapter_id}").status_code == 204
    assert stored_state(client) == (0, [])
    assert client.get(f"/adapters/{adapter_id}").status_code == 404
    assert client.get(f"/adapters/{adapter_id}/download").status_code == 404
    assert client.delete(f"/adapters/{adapter_id}").status_code == 404
    gone = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "a fine film", "max_new_tokens": 2})
    assert gone.status_code == 404


def test_delete_of_an_adapter_a_job_not_ended_starts_from_gets_409_naming_the_job(client, tiny_base):
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 3, seed=7))["id"]
    with client.app.state.runtime.sessions() as session:
        jobs.create_job(session, job_id="warm", name="warm", params={}, dataset_path="datasets/warm", train_examples=1,
                        validation_examples=0, base_adapter_id=adapter_id)
    refused = client.delete(f"/adapters/{adapter_id}")
    assert refused.status_code == 409 and "job warm" in refused.json()["detail"]
    assert client.get(f"/adapters/{adapter_id}").status_code == 200
    with client.app.state.runtime.sessions() as session:
        assert jobs.cancel(session, "warm") == "cancelled"
    assert client.delete(f"/adapters/{adapter_id}").status_code == 204
