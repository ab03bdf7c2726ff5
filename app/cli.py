"""Command line.

    python -m app.cli prepare-model      convert and cache the base model once
    python -m app.cli run                the API plus one training worker beside it
"""

import argparse
import logging
import subprocess
import sys

from app.config import get_settings
from app.engine.loader import default_model_dir, fingerprint


def prepare_model() -> None:
    settings = get_settings()
    if settings.base_model is not None:
        folder = settings.base_model
        if not (folder / "config.json").exists():
            raise SystemExit(f"BASE_MODEL {folder} is not a Hugging Face model folder (no config.json)")
        name = folder.resolve().name
    else:
        folder = default_model_dir(settings.model_cache_dir)  # shows conversion progress bars
        name = folder.name
    print(f"base model ready: {folder} ({fingerprint(folder, name)})")


def run(host: str, port: int) -> None:
    """Serve the API with one Celery training worker as a child process; stop both together."""
    import uvicorn

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--concurrency=1", "--loglevel=INFO"]
    )
    try:
        print(f"softserve on http://{host}:{port}  (API docs: http://{host}:{port}/docs)", flush=True)
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="softserve")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare-model", help="convert and cache the default base model (once)")
    serve = commands.add_parser("run", help="serve the API and one training worker")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.command == "prepare-model":
        prepare_model()
    else:
        run(args.host, args.port)


if __name__ == "__main__":
    main()
