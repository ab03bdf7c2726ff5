"""A node holds ONE copy of the base model. Its engine owns the model; its training consumer
(worker.consumer) hands jobs' work to that engine. Two shapes:

    python -m worker.node serve [--host H --port P]   the API and training on one model (`make run`)
    python -m worker.node train                       training only, no HTTP (`make worker`)
"""

import argparse
import asyncio
import logging
import signal

from fastapi import FastAPI

from app.cli import serve_api
from app.config import get_settings
from app.main import create_app
from app.observability import configure_logging
from app.runtime import running, serving
from worker.consumer import training_consumer

log = logging.getLogger(__name__)


def serving_app() -> FastAPI:
    """uvicorn's app factory for a node that serves and trains."""
    return create_app(services=[training_consumer], trains=True)


async def train_only() -> None:
    """Train until SIGTERM or SIGINT; a running job is then queued again for another node."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running(get_settings(), serves=False) as runtime, serving(runtime, [training_consumer]):
        log.info("training node ready: waiting for jobs on %s", runtime.settings.broker_url.split("@")[-1])
        await stop.wait()


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    parser = argparse.ArgumentParser(prog="python -m worker.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_subparsers(dest="shape", required=True)
    serve = shapes.add_parser("serve", help="serve the API and train, on one model")
    serve.add_argument("--host", default=settings.host)
    serve.add_argument("--port", type=int, default=settings.port)
    shapes.add_parser("train", help="train only (no HTTP)")
    args = parser.parse_args()
    if args.shape == "serve":
        serve_api(args.host, args.port, factory="worker.node:serving_app")
    else:
        asyncio.run(train_only())


if __name__ == "__main__":
    main()
