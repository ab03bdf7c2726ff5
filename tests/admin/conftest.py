"""Admin UI fixtures: a headless Chromium, data seeded straight into a running server's
registry, console-error capture and screenshots."""

import math
from pathlib import Path

import pytest

from app import jobs, registry
from app.models import new_id
from app.storage import adapter_key
from app.train_config import TrainConfig
from tests.conftest import REPO, random_soft_prompt

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "test-output" / "screenshots"
TEMPLATE = "Review: {input}\nSentiment:"


@pytest.fixture
def browser():
    # Fail loudly rather than skip: `make test` installs chromium, and a silent skip would hide the UI going untested.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the admin browser tests need Debian's chromium "
                    "(apt-get install -y chromium; `make test` installs it)")
    from playwright.sync_api import expect, sync_playwright

    # Assertions wait as long as actions do (below): on a busy 2-core machine a generation the page
    # shows can take more than expect's default 5 s.
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


class Console:
    """Collects a page's console errors and uncaught exceptions."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))


def open_page(browser, server):
    """A fresh browser context (its own cookies) on the live server, and its console."""
    page = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 860}).new_page()
    page.set_default_timeout(15_000)
    return page, Console(page)


def screenshot(page, name: str) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def add_adapter(runtime, name: str, *, tokens: int = 8, seed: int = 0, template: str | None = TEMPLATE,
                metrics: dict | None = None, source: str = "trained"):
    with runtime.sessions() as session:
        return registry.register_adapter(
            session, storage=runtime.storage, name=name,
            prompt_embeddings=random_soft_prompt(runtime.base, tokens, seed), base_fingerprint=runtime.base.fingerprint,
            base_model_name=runtime.base.name, source=source, metrics=metrics, template=template,
        )


def add_running_job(runtime, name: str, *, total: int = 60, done: int = 40, eval_every: int = 10) -> str:
    """A job as a worker leaves it midway: claimed, `done` loss points, an evaluation every `eval_every`."""
    job_id = new_id()
    with runtime.sessions() as session:
        jobs.create_job(session, job_id=job_id, name=name, params=TrainConfig(max_steps=total, eval_every=eval_every).to_dict(),
                        dataset_path=f"datasets/{job_id}", train_examples=200, validation_examples=50)
        jobs.claim(session, job_id, "test-worker")
        record_progress(session, job_id, range(1, done + 1), total, eval_every)
    return job_id


def record_progress(session, job_id: str, steps, total: int, eval_every: int) -> None:
    token = jobs.get_job(session, job_id).run_token  # as the run that claimed it
    for step in steps:  # a plausible decaying, slightly noisy curve
        loss = 2.2 * math.exp(-step / 12) + 0.35 + 0.05 * math.sin(step)
        jobs.record_step(session, job_id, token, step, total, step / 25, loss)
        if step % eval_every == 0:
            jobs.record_eval(session, job_id, token, step, 1.9 * math.exp(-step / 15) + 0.45, min(0.95, 0.5 + step / 100))


def add_checkpoint(runtime, job_id: str, step: int, metrics: dict) -> str:
    """A checkpoint adapter of the running job at `step`, stored as its run stores one; its id."""
    with runtime.sessions() as session:
        token = jobs.get_job(session, job_id).run_token
    adapter, files = registry.new_adapter(
        name=f"checkpoint-step-{step}", prompt_embeddings=random_soft_prompt(runtime.base, 8, step),
        base_fingerprint=runtime.base.fingerprint, base_model_name=runtime.base.name, source=registry.CHECKPOINT,
        metrics=metrics | {"step": step, "job_id": job_id}, template=TEMPLATE)
    with runtime.sessions() as session, runtime.storage.storing(session, adapter_key(adapter.id), files):
        assert jobs.add_checkpoint(session, job_id, token, adapter, step, metrics | {"step": step})
    return adapter.id
