"""How the adapter list pages scale: median latency with 100 and with 10,000 adapters.

Each size gets a fresh SQLite registry (migrated with Alembic, rows bulk-inserted) and the real
app around the default int8 model, called in-process over ASGI. The result compares the two sizes
in one run, so machine noise mostly cancels.

    python -m bench.admin_pages [--repeats 15]
"""

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import insert

from app.config import Settings
from app.db import make_engine, make_session_factory
from app.engine.loader import load_base_model
from app.main import create_app
from app.models import Adapter

REPO = Path(__file__).resolve().parents[1]
PAGES = {
    "admin_newest": "/admin/adapters",
    "admin_by_accuracy": "/admin/adapters?sort=-eval_accuracy",
    "admin_by_name_last_page": "/admin/adapters?sort=name&page=last",
    "admin_search": "/admin/adapters?q=adapter-01",
    "api_list": "/adapters?limit=100",
}


def _migrate(url: str) -> None:
    config = Config(str(REPO / "alembic.ini"))
    config.set_main_option("script_location", str(REPO / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def _rows(n: int, fingerprint: str) -> list[dict]:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        dict(id=f"{i:012x}", name=f"adapter-{(i * 7919) % n:05d}", base_fingerprint=fingerprint,
             num_virtual_tokens=20, sha256="0" * 64, size_bytes=82_000 + i % 100, source="trained",
             metrics={"eval_accuracy": (i * 13) % 1000 / 1000}, template="{input}",
             created_at=start + timedelta(seconds=i))
        for i in range(n)
    ]


def _measure(base, n: int, repeats: int, folder: Path) -> dict[str, float]:
    url = f"sqlite:///{folder / f'registry-{n}.db'}"
    _migrate(url)
    with make_session_factory(make_engine(url))() as session:
        session.execute(insert(Adapter), _rows(n, base.fingerprint))
        session.commit()
    settings = Settings(data_dir=folder / f"data-{n}", database_url=url)
    medians = {}
    with TestClient(create_app(settings, base=base)) as client:
        for name, path in PAGES.items():
            if name == "admin_by_name_last_page":
                path = path.replace("page=last", f"page={(n + 19) // 20}")
            timings = []
            for _ in range(repeats + 1):  # the first call warms caches and is not counted
                started = time.perf_counter()
                response = client.get(path)
                timings.append(time.perf_counter() - started)
                assert response.status_code == 200, (path, response.status_code)
            medians[name] = round(statistics.median(timings[1:]) * 1000, 2)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    base = load_base_model(None, Settings().model_cache_dir, quantization="int8", device="cpu")
    with tempfile.TemporaryDirectory() as work:
        small = _measure(base, 100, args.repeats, Path(work))
        large = _measure(base, 10_000, args.repeats, Path(work))
    ratios = {name: round(large[name] / small[name], 2) for name in PAGES}
    for name in PAGES:
        print(f"{name:<26} 100: {small[name]:7.2f} ms   10,000: {large[name]:7.2f} ms   x{ratios[name]}")
    print(json.dumps({"median_ms_100": small, "median_ms_10000": large, "ratio_10000_vs_100": ratios,
                      "worst_ratio": max(ratios.values())}))


if __name__ == "__main__":
    main()
