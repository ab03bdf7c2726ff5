"""Command line: `python -m app.cli prepare-model` converts and caches the base model once."""

import argparse
import logging

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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="softserve")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare-model", help="convert and cache the default base model (once)")
    args = parser.parse_args()
    if args.command == "prepare-model":
        prepare_model()


if __name__ == "__main__":
    main()
