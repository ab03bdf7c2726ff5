"""Command line.

    python -m app.cli prepare-model                      convert and cache the base model once
                                                         (BASE_MODEL: a folder, or a packaged model's name)
    python -m app.cli api [--host H --port P]            the API alone, no training (scale-out)
    (a node that serves AND trains on one model: python -m worker.node serve)
    python -m app.cli create-key --role admin|inference  make an API key (printed once)
    python -m app.cli list-keys / revoke-key ID          see and revoke keys
    python -m app.cli move-files-to-database             once, after `alembic upgrade head` (0007): move the
                                                         adapters and datasets kept under DATA_DIR into the
                                                         database (shared storage); safe to run again
"""

import argparse
import os

from app.config import get_settings
from app.engine.loader import fingerprint, model_dir_and_name
from app.observability import configure_logging


def prepare_model() -> None:
    settings = get_settings()
    try:  # a packaged model (the default one, or BASE_MODEL naming one) is converted here, with progress bars
        folder, name = model_dir_and_name(settings.base_model, settings.model_cache_dir)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    print(f"base model ready: {folder} ({fingerprint(folder, name)})")


def serve_api(host: str, port: int, factory: str = "app.main:create_app") -> None:
    import uvicorn

    # The app reads HOST to decide whether it may run without keys, so both must agree.
    os.environ["HOST"], os.environ["PORT"] = host, str(port)
    get_settings.cache_clear()
    print(f"softserve on http://{host}:{port}  (admin: /admin, API docs: /docs)", flush=True)
    # Logging is ours (configure_logging): one line per request comes from RequestObserver.
    # Forwarded headers are read inside the app (app.main), which also keeps the direct peer.
    uvicorn.run(factory, factory=True, host=host, port=port, log_config=None, access_log=False, proxy_headers=False)


def _sessions():
    from app.db import make_engine, make_session_factory

    return make_session_factory(make_engine(get_settings().database_url))


def create_key(role: str, name: str) -> None:
    from app import auth

    with _sessions()() as session:
        row, key = auth.create_key(session, role, name)
    print(f"created {role} key {row.id} ({name}). Store it now; it is not shown again:\n{key}")


def list_keys() -> None:
    from sqlalchemy import select

    from app.models import ApiKey

    with _sessions()() as session:
        for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            print(f"{row.id}  {row.role:<9}  {row.created_at:%Y-%m-%d %H:%M}  {row.name}")


def revoke_key(key_id: str) -> None:
    from app.models import ApiKey

    with _sessions()() as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise SystemExit(f"no key with id {key_id}")
        session.delete(row)
        session.commit()
    print(f"revoked key {key_id}")


def move_files_to_database() -> None:
    from sqlalchemy import inspect

    from app.db import make_engine, make_session_factory
    from app.storage_move import move_files_to_database as move

    settings = get_settings()
    if settings.storage == "directory":
        raise SystemExit("STORAGE=directory: nodes read files from STORAGE_DIR, so moving them into the database "
                         "would hide them. Unset STORAGE (database is the default) first.")
    engine = make_engine(settings.database_url)
    if not inspect(engine).has_table("stored_files"):
        raise SystemExit("the database has no stored_files table: run `alembic upgrade head` first")
    report = move(data_dir=settings.data_dir, sessions=make_session_factory(engine))
    print(f"moved {report.adapters} adapters and {report.datasets} datasets of queued or running jobs from "
          f"{settings.data_dir} into the database; deleted {report.ended_datasets} datasets of ended jobs")
    for folder in report.left:
        print(f"left {folder}: no adapter or job in the registry has it")


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    parser = argparse.ArgumentParser(prog="softserve")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare-model", help="convert and cache the default base model (once)")
    serve = commands.add_parser("api", help="serve the API only (no training)")
    serve.add_argument("--host", default=settings.host)
    serve.add_argument("--port", type=int, default=settings.port)
    create = commands.add_parser("create-key", help="create an API key and print it once")
    create.add_argument("--role", choices=["inference", "admin"], required=True)
    create.add_argument("--name", default="")
    commands.add_parser("list-keys", help="list API keys (ids and roles, never the keys)")
    revoke = commands.add_parser("revoke-key", help="delete an API key")
    revoke.add_argument("key_id")
    commands.add_parser("move-files-to-database", help="move adapters and datasets kept under DATA_DIR into the database")
    args = parser.parse_args()
    if args.command == "prepare-model":
        prepare_model()
    elif args.command == "api":
        serve_api(args.host, args.port)
    elif args.command == "create-key":
        create_key(args.role, args.name or f"{args.role} key")
    elif args.command == "list-keys":
        list_keys()
    elif args.command == "move-files-to-database":
        move_files_to_database()
    else:
        revoke_key(args.key_id)


if __name__ == "__main__":
    main()
