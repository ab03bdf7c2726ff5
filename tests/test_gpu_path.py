"""The GPU path, run on the CPU: what a CUDA node computes, checked where no GPU is.

`INT8_KERNELS=bitsandbytes` keeps bitsandbytes' own int8 forward (none of the CPU's int8 fast
path, no int8 LM head) and `COMPUTE_DTYPE` a half-precision dtype for everything else: the
activations, norms, embeddings and soft prompts, and the KV cache, as on a GPU. Here the engine
(mixed adapters of both kinds, the prefix cache, rows joining mid-flight) matches the no-cache
reference in the same dtype, every architecture of the test matrix trains in bfloat16 and in
float16 (with loss scaling) without a dtype error, and the dtype policy refuses float16 for
Gemma 3, whose activations overflow it, and gives it bfloat16.

With DEVICE=cuda (bench/gpu_check.sh) the same tests run on a GPU, and skip where there is none.
"""

from pathlib import Path

import pytest
import torch

from app import jobs
from app.datasets import Example
from app.db import make_engine, make_session_factory
from app.engine import dtypes
from app.engine.core import EngineCore
from app.engine.loader import BaseModel
from app.engine.reference import check_against_reference
from app.engine.requests import GenerationRequest
from app.train_config import TrainConfig
from tests.conftest import (
    HALF_TIE_TOLERANCE,
    NO_GPU_FOR_DEVICE,
    SECOND_REAL_MODEL,
    build_tiny_model,
    make_settings,
    on_gpu_path,
    random_prefix_kv,
    random_soft_prompt,
)
from tests.test_architectures import EXAMPLES, FAMILIES, TEMPLATE
from tests.worker.test_job_runner import queue_job
from worker.job_runner import run_job
from worker.training import Hooks, train_adapter

HALF = ["bfloat16", "float16"]
pytestmark = pytest.mark.skipif(NO_GPU_FOR_DEVICE, reason="DEVICE=cuda and no GPU here")
PROMPTS = ["Review: a gripping, funny film\nSentiment:", "Once upon a time", "The capital of France is", "ok"]


@pytest.fixture(scope="module", params=["gemma-3-270m", SECOND_REAL_MODEL])
def packaged_on_gpu_path(request) -> BaseModel:
    """Each packaged real model as a CUDA node with bfloat16 would load it (Gemma 3 overflows float16)."""
    if request.param == "gemma-3-270m":
        return request.getfixturevalue("gemma_on_gpu_path")
    return on_gpu_path(Path(request.param), "bfloat16")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory) -> Path:
    make_config, pad_token = FAMILIES[request.param]
    return build_tiny_model(tmp_path_factory.mktemp(request.param), make_config(), pad_token=pad_token)


def mixed_requests(base: BaseModel, count: int, max_new_tokens: int) -> list[GenerationRequest]:
    """Soft prompts and prefixes in turn, two of the same adapter (the second reads its prefix
    from the cache), over several prompts."""
    requests = []
    for i in range(count):
        ids = base.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids
        adapter = i // 2 if i < 4 else i  # rows 0-1 and 2-3 share an adapter
        soft = random_soft_prompt(base, 3 + adapter, seed=adapter) if adapter % 2 == 0 else random_prefix_kv(
            base, 2 + adapter, seed=adapter)
        requests.append(GenerationRequest(ids, soft, max_new_tokens))
    return requests


def run_joining_mid_flight(base: BaseModel, requests: list[GenerationRequest]) -> list:
    """Requests join the engine one a step, while the earlier ones decode; returns their rows once
    all are done."""
    core = EngineCore(base, kv_tokens=4096, max_rows=8, max_step_tokens=64)
    rows = []
    with torch.inference_mode():
        for request in requests:
            rows.append(core.add(request))
            core.step()
        while core.has_work():
            core.step()
    assert all(row.error is None for row in rows), [row.error for row in rows]
    assert core.prefix.stats()["reused_tokens"] > 0  # the shared adapters' rows read cached prefixes
    return rows


def assert_match_the_reference(base: BaseModel, requests: list[GenerationRequest], rows: list) -> None:
    for request, row in zip(requests, rows):
        check = check_against_reference(base, request.soft_prompt, request.prompt_ids, row.result.token_ids,
                                        request.max_new_tokens, HALF_TIE_TOLERANCE)
        assert check.agrees, (base.name, base.embed_dtype, check)


@pytest.mark.parametrize("dtype", HALF)
def test_the_engine_on_the_gpu_path_matches_the_reference_on_every_architecture(family_folder, dtype):
    base = on_gpu_path(family_folder, dtype)
    assert base.embed_dtype == dtypes.DTYPES[dtype] and base.int8_kernels == "bitsandbytes"
    assert base.kv_shape.dtype == dtypes.DTYPES[dtype]  # a half-precision KV cache
    requests = mixed_requests(base, 8, max_new_tokens=8)
    assert_match_the_reference(base, requests, run_joining_mid_flight(base, requests))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_every_architecture_trains_in_half_precision_without_a_dtype_error(family_folder, dtype, method):
    """The seed's failure on a GPU was a norm in float32 fed float16 int8 outputs ("expected scalar
    type Float but found Half"); float16 also needs its loss scaled, or small gradients vanish."""
    base = on_gpu_path(family_folder, dtype)
    # float16's first steps may be skipped while the loss scale comes down to where gradients fit.
    config = TrainConfig(method=method, num_virtual_tokens=4, max_steps=6, eval_every=6, batch_size=len(EXAMPLES),
                         learning_rate=0.05, template=TEMPLATE, init="random")
    start = train_adapter(base, config.model_copy(update={"max_steps": 0, "eval_every": 1}), EXAMPLES,
                          validation=EXAMPLES).learned.values
    result = train_adapter(base, config, EXAMPLES, validation=EXAMPLES)
    assert result.steps == 6 and result.learned.values.dtype == torch.float32  # trained in float32, whatever the model's dtype
    assert torch.isfinite(result.learned.values).all() and not torch.equal(result.learned.values, start)


@pytest.mark.real_model
def test_both_packaged_models_serve_on_the_gpu_path_like_the_reference(packaged_on_gpu_path):
    base = packaged_on_gpu_path
    requests = mixed_requests(base, 4, max_new_tokens=5)
    assert_match_the_reference(base, requests, run_joining_mid_flight(base, requests))


@pytest.mark.real_model
def test_the_float16_probe_refuses_gemma_3_and_the_policy_gives_it_bfloat16(real_base):
    found = dtypes.probe(real_base.model, real_base.tokenizer)
    assert not found.fits_float16 and found.magnitude > dtypes.FLOAT16_MAX  # |h| passes 100,000
    assert found.module.startswith("model.layers.")
    cuda = torch.device("cuda")
    assert dtypes.plan("auto", cuda, bfloat16_capable=True) == dtypes.Plan(torch.bfloat16, probe_float16=False)
    assert dtypes.plan("auto", cuda, bfloat16_capable=False) == dtypes.Plan(torch.float16, probe_float16=True)
    assert dtypes.plan("auto", torch.device("cpu"), bfloat16_capable=True).dtype == torch.float32
    with pytest.raises(dtypes.Float16Overflow, match=f"{found.module} reaches"):
        on_gpu_path(None, "float16")


def test_a_model_that_fits_float16_gets_it_and_one_that_does_not_falls_back_to_float32(family_folder, monkeypatch):
    assert on_gpu_path(family_folder, "float16").embed_dtype == torch.float16  # tiny models fit
    monkeypatch.setattr(dtypes, "bfloat16_capable", lambda device: False)  # a GPU older than Ampere...
    monkeypatch.setattr(dtypes, "FLOAT16_MAX", 1.0)  # ...and a model whose activations overflow float16
    assert on_gpu_path(family_folder, "auto").embed_dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF)
def test_training_on_the_gpu_path_lowers_the_eval_loss(tmp_path, dtype):
    folder = build_tiny_model(tmp_path / "tiny")
    base = on_gpu_path(folder, dtype)
    examples = [Example(f"review number {i} is {'good' if i % 2 else 'bad'}", ["negative", "positive"][i % 2])
                for i in range(24)]
    evals = []
    config = TrainConfig(num_virtual_tokens=4, max_steps=30, eval_every=10, batch_size=8, template="{input} =>")
    train_adapter(base, config, examples, examples[:8], Hooks(on_eval=lambda step, loss, accuracy: evals.append(loss)))
    assert len(evals) == 3 and evals[-1] < evals[0]


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_both_packaged_models_run_a_training_job_on_the_gpu_path(tmp_path, sqlite_url, packaged_on_gpu_path, method):
    base = packaged_on_gpu_path
    settings = make_settings(tmp_path, sqlite_url)
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    job_id = queue_job(settings, sessions, method=method, max_steps=2, eval_every=2, batch_size=2)
    assert run_job(job_id, settings=settings, sessions=sessions, base=base) == "succeeded"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert job.step == 2 and job.adapter_id and job.eval_loss == job.eval_loss  # a number, not NaN
    engine.dispose()
