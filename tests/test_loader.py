"""Loading the base model and fingerprinting it."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.loader import (
    DEFAULT_MODEL_NAME,
    fingerprint,
    load_base_model,
    model_dir_and_name,
    packaged_model_dir,
    resolve_device,
)
from tests.conftest import SECOND_REAL_MODEL


def test_fingerprint_is_stable_and_tracks_config_and_tokenizer(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert fingerprint(copy, "m") == fingerprint(tiny_model_dir, "m")
    # How weights are stored is not part of the identity...
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"transformers_version": "0.0", "dtype": "bfloat16"}))
    assert fingerprint(copy, "m") == fingerprint(tiny_model_dir, "m")
    # ...but the architecture and the tokenizer are.
    (copy / "config.json").write_text(json.dumps(config | {"hidden_size": 128}))
    assert fingerprint(copy, "m") != fingerprint(tiny_model_dir, "m")
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"<eos>"', '"<end>"'))
    assert fingerprint(copy, "m") != fingerprint(tiny_model_dir, "m")


def test_any_local_hf_folder_loads_with_its_name(tiny_model_dir):
    base = load_base_model(tiny_model_dir, tiny_model_dir, quantization="bf16", device="cpu")
    assert base.name == tiny_model_dir.name and base.fingerprint.startswith(tiny_model_dir.name + "@")
    assert base.hidden_size == 64 and str(base.embed_dtype) == "torch.bfloat16"
    assert not any(p.requires_grad for p in base.model.parameters())


@pytest.mark.parametrize("quantization", ["int8", "bf16"])
def test_the_model_keeps_its_own_layers_not_hub_kernels(tiny_model_dir, quantization):
    # transformers 5 swaps layers for kernels from the hub unless told not to: on a GPU that
    # fetch fails offline (seen on an H200), and the swapped kernels are not what the reference checks.
    base = load_base_model(tiny_model_dir, tiny_model_dir, quantization=quantization, device="cpu")
    assert base.model.use_kernels is False


def test_a_gpu_device_is_resolved_with_its_index(monkeypatch):
    # torch.cuda's memory queries (the memory plan's) refuse a "cuda" device without an index
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        load_base_model(tmp_path / "nothing", tmp_path)


@pytest.mark.real_model
def test_default_model_is_cached_and_int8(real_base):
    from bitsandbytes.nn import Linear8bitLt

    folder = packaged_model_dir(DEFAULT_MODEL_NAME, Settings().model_cache_dir)
    assert folder.name == DEFAULT_MODEL_NAME and (folder / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert real_base.hidden_size == 640 and real_base.quantization == "int8"
    assert isinstance(real_base.model.model.layers[0].mlp.down_proj, Linear8bitLt)
    assert real_base.fingerprint == fingerprint(folder, DEFAULT_MODEL_NAME)


def test_base_model_is_a_folder_or_a_packaged_models_name(tmp_path, monkeypatch):
    converted = tmp_path / "cache" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # already converted: nothing is fetched
    assert model_dir_and_name(Path("smollm2-135m"), tmp_path / "cache") == (converted, "smollm2-135m")
    folder = tmp_path / "my-model"
    with pytest.raises(FileNotFoundError, match="nor one of the packaged models"):
        model_dir_and_name(folder, tmp_path / "cache")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert model_dir_and_name(folder, tmp_path / "cache") == (folder, "my-model")
    # A folder that happens to carry a packaged model's name is still the folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    assert model_dir_and_name(Path("smollm2-135m"), tmp_path / "cache") == (Path("smollm2-135m"), "smollm2-135m")


@pytest.mark.real_model
def test_second_real_model_comes_from_pypi_as_a_llama(second_real_base):
    from bitsandbytes.nn import Linear8bitLt

    folder = Settings().model_cache_dir / SECOND_REAL_MODEL
    assert (folder / "model.safetensors").exists()
    assert type(second_real_base.model).__name__ == "LlamaForCausalLM" and second_real_base.hidden_size == 576
    assert isinstance(second_real_base.model.model.layers[0].mlp.down_proj, Linear8bitLt)
    assert second_real_base.fingerprint == fingerprint(folder, SECOND_REAL_MODEL)


def _slow_make(log_file: Path, work: Path, staging: Path) -> None:
    """A stand-in conversion that takes a while and says who ran it."""
    import os
    import time

    with open(log_file, "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    staging.mkdir()
    (staging / "config.json").write_text("{}")


def _prepare(target: str, log_file: str, results) -> None:
    from functools import partial

    from app.engine.loader import made_once

    results.put(str(made_once(Path(target), partial(_slow_make, Path(log_file)))))


def test_two_processes_preparing_the_model_at_once_both_get_the_folder_made_once(tmp_path):
    """Issue 21, finding 9: the second process failed at os.replace ("Directory not empty")."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results, log_file, target = context.Queue(), tmp_path / "made-by", tmp_path / "models" / "gemma"
    workers = [context.Process(target=_prepare, args=(str(target), str(log_file), results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert [results.get(timeout=5) for _ in workers] == [str(target)] * 2
    assert len(log_file.read_text().split()) == 1  # one conversion; the other process used its folder
    assert (target / "config.json").exists()


def test_a_folder_left_half_made_is_made_again(tmp_path):
    from functools import partial

    from app.engine.loader import made_once

    target = tmp_path / "models" / "gemma"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("half")  # no config.json: not whole
    assert made_once(target, partial(_slow_make, tmp_path / "made-by")) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
