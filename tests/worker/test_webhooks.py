"""Signed webhooks for job events: the delivery rows written with the job's state change, and the
delivery loop (signatures, retries with backoff, giving up, address checks, one claim per row) on
SQLite and PostgreSQL, against a real HTTP listener."""

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import threading
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update
from standardwebhooks import Webhook, WebhookVerificationError

from app import jobs, webhook_delivery, webhook_urls, webhooks
from app.db import make_engine, make_session_factory
from app.job_status import JobStatus
from app.models import TrainJob, WebhookDelivery, utcnow
from app.webhook_delivery import Outcome, WebhookSender, backoff_s, claim_due, make_client, record
from tests.conftest import make_settings
from tests.webhook_listener import Listener
from tests.worker.test_job_runner import queue_job
from worker.job_runner import run_job

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def listener():
    with Listener() as listener:
        yield listener


@pytest.fixture
def make_env(tmp_path, database_url):
    """Settings (webhooks on, to `listener` unless told otherwise) and the node's session factory."""
    engines = []

    def _make(**overrides):
        settings = make_settings(tmp_path, database_url, **({"webhook_secret": SECRET} | overrides))
        engines.append(make_engine(database_url))
        return settings, make_session_factory(engines[-1], webhooks.session_info(settings))

    yield _make
    for engine in engines:
        engine.dispose()


def make_job(sessions, job_id: str = "job1", metadata: dict | None = None) -> str:
    with sessions() as session:
        jobs.create_job(session, job_id=job_id, name="hooked", params={}, dataset_path=f"datasets/{job_id}",
                        train_examples=1, validation_examples=0)
        session.execute(update(TrainJob).where(TrainJob.id == job_id).values(job_metadata=metadata))
        session.commit()
    return job_id


def deliveries(sessions, job_id: str | None = None) -> list[WebhookDelivery]:
    with sessions() as session:
        query = select(WebhookDelivery).order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        return list(session.scalars(query.where(WebhookDelivery.job_id == job_id) if job_id else query))


def messages(sessions, job_id: str) -> list[str]:
    with sessions() as session:
        return [e.data["message"] for e in jobs.list_events(session, job_id) if e.kind == "message"]


def webhook_messages(sessions, job_id: str) -> list[str]:
    return [m for m in messages(sessions, job_id) if m.startswith("webhook ")]


async def run_pass(settings, sessions) -> int:
    async with make_client(settings) as client:
        return await WebhookSender(sessions, settings, client).run_pass()


def independently_verified(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The Standard Webhooks signature, computed here from the spec rather than by the library."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return expected in headers["webhook-signature"].split(" ")


# --- delivery rows: written with the job's state change, or not at all ---


def test_each_job_end_writes_its_event_with_the_state_change(make_env, listener):
    settings, sessions = make_env(webhook_url=listener.url)
    with sessions() as session:
        for job_id in ("ok", "bad", "stopped", "queued", "lost", "lost-cancel"):
            make_job(sessions, job_id)
        jobs.cancel(session, "queued")  # queued -> cancelled at once
        tokens = {job_id: jobs.claim(session, job_id, "node-a") for job_id in ("ok", "bad", "stopped", "lost", "lost-cancel")}
        assert jobs.finish(session, "ok", tokens["ok"], JobStatus.SUCCEEDED, message="done")
        assert jobs.finish(session, "bad", tokens["bad"], JobStatus.FAILED, message="boom", error_code="x")
        assert jobs.finish(session, "stopped", tokens["stopped"], JobStatus.CANCELLED, message="cancelled")
        session.execute(update(TrainJob).where(TrainJob.id.in_(["lost", "lost-cancel"]))
                        .values(heartbeat_at=utcnow() - timedelta(minutes=5), attempts=2))
        session.execute(update(TrainJob).where(TrainJob.id == "lost-cancel").values(cancel_requested=True))
        session.commit()
        assert jobs.reap_stale(session, stale_after=timedelta(seconds=60), max_attempts=2) == []
    expected = {"ok": "succeeded", "bad": "failed", "stopped": "cancelled", "queued": "cancelled", "lost": "failed",
                "lost-cancel": "cancelled"}
    rows = deliveries(sessions)
    assert sorted((row.job_id, row.event_type) for row in rows) == sorted(
        (job_id, f"fine_tuning.job.{status}") for job_id, status in expected.items())
    for row in rows:
        assert (row.url, row.status, row.attempts) == (listener.url, "pending", 0)
        assert row.id.startswith("msg_") and row.payload["id"].startswith("evt_")
        assert row.payload == {"object": "event", "id": row.payload["id"], "type": row.event_type,
                               "created_at": row.payload["created_at"], "data": {"id": row.job_id}}
        assert abs(row.payload["created_at"] - time.time()) < 60


def test_a_job_trained_to_its_end_announces_it(tmp_path, sqlite_url, tiny_base):
    settings = make_settings(tmp_path, sqlite_url, webhook_url="https://hooks.example.com/x", webhook_secret=SECRET,
                             heartbeat_interval_s=0.2, job_stale_after_s=1.0)
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine, webhooks.session_info(settings))
    job_id = queue_job(settings, sessions)
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    assert [(row.job_id, row.event_type) for row in deliveries(sessions)] == [(job_id, "fine_tuning.job.succeeded")]
    engine.dispose()


def test_a_transition_that_fails_writes_no_event(make_env, listener):
    settings, sessions = make_env(webhook_url=listener.url)
    make_job(sessions)
    with sessions() as session:
        assert jobs.claim(session, "job1", "node-a")
        assert not jobs.finish(session, "job1", "not-the-token", JobStatus.SUCCEEDED, message="done")  # a stale run
        jobs.cancel(session, "job1")  # running: only asked to stop, no end yet
        assert jobs.get_job(session, "job1").status == "running"
    assert deliveries(sessions) == []
    # Heartbeats are fresh: the reaper ends nothing, so it writes nothing either.
    with sessions() as session:
        jobs.reap_stale(session, stale_after=timedelta(seconds=60), max_attempts=1)
    assert deliveries(sessions) == []


def test_the_event_is_in_the_state_changes_transaction(make_env, listener):
    """Rolled back with the change, and invisible to other sessions until the change commits."""
    settings, sessions = make_env(webhook_url=listener.url)
    make_job(sessions)
    with sessions() as session:
        assert jobs._transition(session, "job1", JobStatus.QUEUED, status=JobStatus.CANCELLED)
        webhooks.enqueue_job_event(session, "job1", JobStatus.CANCELLED)
        session.flush()
        assert deliveries(sessions) == []  # not committed: another session sees none
        session.rollback()
    assert deliveries(sessions) == [] and jobs_status(sessions, "job1") == "queued"


def jobs_status(sessions, job_id: str) -> str:
    with sessions() as session:
        return jobs.get_job(session, job_id).status


def test_targets_webhook_url_and_the_jobs_own_url_and_nothing_when_webhooks_are_off(make_env, listener):
    settings, sessions = make_env(webhook_url=listener.url, webhook_allowed_hosts="hooks.example.com")
    make_job(sessions, "both", metadata={"webhook_url": "https://hooks.example.com/job?t=1"})
    make_job(sessions, "same", metadata={"webhook_url": listener.url})  # one delivery per distinct URL
    # No URL at all (the API refuses it; a row it could not store would fail the job's transition)
    make_job(sessions, "junk", metadata={"webhook_url": "https://x/" + "a" * 2000})
    for job_id in ("both", "same", "junk"):
        with sessions() as session:
            jobs.cancel(session, job_id)
    assert sorted(row.url for row in deliveries(sessions, "both")) == sorted(["https://hooks.example.com/job?t=1", listener.url])
    assert [row.url for row in deliveries(sessions, "same")] == [row.url for row in deliveries(sessions, "junk")] == [
        listener.url]
    both = deliveries(sessions, "both")
    assert both[0].payload == both[1].payload and both[0].id != both[1].id  # one event, a message per target

    _, off = make_env(webhook_secret=None)  # no WEBHOOK_SECRET: webhooks off, even for a job's own URL
    make_job(off, "off", metadata={"webhook_url": "https://hooks.example.com/x"})
    with off() as session:
        jobs.cancel(session, "off")
    assert deliveries(off, "off") == []


# --- delivery ---


async def test_delivery_is_signed_in_the_standard_webhooks_form(make_env, listener):
    settings, sessions = make_env(webhook_url=listener.url)
    make_job(sessions)
    with sessions() as session:
        jobs.cancel(session, "job1")
    assert await run_pass(settings, sessions) == 1
    [received] = listener.received
    headers, body = received.headers, received.body
    assert received.path == "/hooks/softserve?token=abc" and headers["content-type"] == "application/json"
    [row] = deliveries(sessions)
    assert headers["webhook-id"] == row.id and abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert Webhook(SECRET).verify(body, headers) == row.payload  # the reference library
    assert independently_verified(SECRET, headers, body)  # and the spec, by hand
    other = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    assert not independently_verified(other, headers, body)
    event = json.loads(body)
    assert (event["object"], event["type"], event["data"]) == ("event", "fine_tuning.job.cancelled", {"id": "job1"})
    assert (row.status, row.attempts, row.last_error) == ("delivered", 1, None) and row.delivered_at is not None
    port = listener.port
    assert webhook_messages(sessions, "job1") == [
        f"webhook fine_tuning.job.cancelled to http://127.0.0.1:{port} delivered (HTTP 200, attempt 1)"]
    assert await run_pass(settings, sessions) == 0 and len(listener.received) == 1  # delivered once


async def test_a_failed_attempt_is_retried_after_its_backoff(make_env):
    with Listener(statuses=[500, 204]) as listener:
        settings, sessions = make_env(webhook_url=listener.url, webhook_backoff_base_s=1.0, webhook_max_attempts=3)
        make_job(sessions)
        with sessions() as session:
            jobs.cancel(session, "job1")
        before = utcnow()
        assert await run_pass(settings, sessions) == 1
        after = utcnow()
        [row] = deliveries(sessions)
        assert (row.status, row.attempts, row.last_error) == ("pending", 1, "HTTP 500")
        assert before + timedelta(seconds=1) <= row.next_attempt_at <= after + timedelta(seconds=1)
        assert await run_pass(settings, sessions) == 0  # not due yet
        await asyncio.sleep((row.next_attempt_at - utcnow()).total_seconds() + 0.05)
        assert await run_pass(settings, sessions) == 1
        first, second = listener.received
    [row] = deliveries(sessions)
    assert (row.status, row.attempts, row.last_error) == ("delivered", 2, None)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == row.id  # the same message, signed anew
    assert Webhook(SECRET).verify(second.body, second.headers) == row.payload
    where = f"webhook fine_tuning.job.cancelled to http://127.0.0.1:{listener.port}"
    assert webhook_messages(sessions, "job1") == [f"{where}: attempt 1 of 3 failed (HTTP 500); next in 1 s",
                                                  f"{where} delivered (HTTP 204, attempt 2)"]


def test_backoff_doubles_up_to_an_hour():
    assert [backoff_s(attempt, 10) for attempt in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_s(30, 10) == 3600


async def test_gives_up_after_max_attempts(make_env):
    with Listener(statuses=[503]) as listener:
        settings, sessions = make_env(webhook_url=listener.url, webhook_backoff_base_s=0.05, webhook_max_attempts=3)
        make_job(sessions)
        with sessions() as session:
            jobs.cancel(session, "job1")
        deadline = time.monotonic() + 10
        while deliveries(sessions)[0].status == "pending" and time.monotonic() < deadline:
            await run_pass(settings, sessions)
            await asyncio.sleep(0.05)
        assert len(listener.received) == 3
    [row] = deliveries(sessions)
    assert (row.status, row.attempts, row.last_error, row.delivered_at) == ("failed", 3, "HTTP 503", None)
    notes = webhook_messages(sessions, "job1")
    assert [note.split(": ", 1)[1] for note in notes[:2]] == [
        "attempt 1 of 3 failed (HTTP 503); next in 0.05 s", "attempt 2 of 3 failed (HTTP 503); next in 0.1 s"]
    assert notes[2].endswith("given up after 3 attempt(s): HTTP 503") and len(notes) == 3
    assert await run_pass(settings, sessions) == 0


async def test_an_unreachable_target_is_retried_with_the_error_recorded(make_env):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings, sessions = make_env(webhook_url=f"http://127.0.0.1:{port}/hook", webhook_timeout_s=2)
    make_job(sessions)
    with sessions() as session:
        jobs.cancel(session, "job1")
    assert await run_pass(settings, sessions) == 1
    [row] = deliveries(sessions)
    assert row.status == "pending" and row.last_error.startswith("ConnectError")


async def test_an_attempt_that_breaks_still_counts(make_env, monkeypatch):
    settings, sessions = make_env(webhook_url="https://hooks.example.com/x", webhook_max_attempts=1)
    make_job(sessions)
    with sessions() as session:
        jobs.cancel(session, "job1")

    async def broken(self, claim):
        raise RuntimeError("boom")

    monkeypatch.setattr(WebhookSender, "attempt", broken)
    assert await run_pass(settings, sessions) == 1
    [row] = deliveries(sessions)
    assert (row.status, row.attempts, row.last_error) == ("failed", 1, "RuntimeError: boom")


async def test_an_attempt_resolution_included_is_cut_off_at_the_timeout(make_env, monkeypatch):
    settings, sessions = make_env(webhook_url="https://hooks.example.com/x", webhook_timeout_s=0.2)
    make_job(sessions)
    with sessions() as session:
        jobs.cancel(session, "job1")

    def slow_to_resolve(url, settings):
        time.sleep(1)

    monkeypatch.setattr(webhook_delivery, "destination", slow_to_resolve)
    started = time.monotonic()
    assert await run_pass(settings, sessions) == 1
    assert time.monotonic() - started < 0.9
    [row] = deliveries(sessions)
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, "no answer within 0.2 s")


async def test_a_slow_delivery_does_not_hold_up_the_next(make_env, listener, monkeypatch):
    settings, sessions = make_env(webhook_url=listener.url)
    attempt = WebhookSender.attempt

    async def slow_for_one_job(self, claim):
        if claim.job_id == "slow":
            await asyncio.sleep(30)
        return await attempt(self, claim)

    monkeypatch.setattr(WebhookSender, "attempt", slow_for_one_job)
    make_job(sessions, "slow")
    with sessions() as session:
        jobs.cancel(session, "slow")
    loop = asyncio.create_task(webhook_delivery.deliver_forever(sessions, settings, interval_s=0.05))
    try:
        deadline = time.monotonic() + 5
        while deliveries(sessions, "slow")[0].attempts == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        make_job(sessions, "fast")
        with sessions() as session:
            jobs.cancel(session, "fast")
        while not listener.received and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(listener.received) == 1 and deliveries(sessions, "fast")[0].status == "delivered"
        assert deliveries(sessions, "slow")[0].status == "pending"  # still under way
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


# --- where a delivery may go ---


async def test_a_jobs_loopback_url_is_refused_unless_its_host_is_listed(make_env, listener):
    settings, sessions = make_env(webhook_allowed_hosts="*")  # any public host
    make_job(sessions, metadata={"webhook_url": listener.url})
    with sessions() as session:
        jobs.cancel(session, "job1")
    assert await run_pass(settings, sessions) == 1
    [row] = deliveries(sessions)
    assert listener.received == [] and (row.status, row.attempts) == ("failed", 1)  # given up at once
    assert row.last_error.startswith("refused: host 127.0.0.1 has a private, loopback or otherwise non-public address")
    assert "given up after 1 attempt(s): refused" in webhook_messages(sessions, "job1")[0]

    listed, listed_sessions = make_env(webhook_allowed_hosts="127.0.0.1")
    make_job(listed_sessions, "job2", metadata={"webhook_url": listener.url})
    with listed_sessions() as session:
        jobs.cancel(session, "job2")
    assert await run_pass(listed, listed_sessions) == 1
    assert len(listener.received) == 1 and deliveries(listed_sessions, "job2")[0].status == "delivered"


async def test_a_host_taken_off_the_list_after_the_job_was_made_is_refused(make_env, listener):
    settings, sessions = make_env(webhook_allowed_hosts="127.0.0.1")
    make_job(sessions, metadata={"webhook_url": listener.url})
    with sessions() as session:
        jobs.cancel(session, "job1")
    now, now_sessions = make_env(webhook_allowed_hosts="hooks.example.com")
    await run_pass(now, now_sessions)
    assert listener.received == []
    assert deliveries(sessions)[0].last_error == "refused: host 127.0.0.1 is not on WEBHOOK_ALLOWED_HOSTS"


async def test_a_name_is_resolved_again_at_delivery_and_the_checked_address_is_used(make_env, listener, monkeypatch):
    """DNS rebinding: a name that was public when the job was made and resolves to a private address
    now is refused; while it resolves to a public one, the connection goes to that very address."""
    settings, sessions = make_env(webhook_allowed_hosts="*")
    url = f"http://hooks.test:{listener.port}/rebind"
    answers = {"hooks.test": "93.184.215.14"}  # public
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(webhook_urls.socket, "getaddrinfo", fake_getaddrinfo)
    assert webhook_urls.webhook_url_problem(url, settings) is None  # as the job is made
    make_job(sessions, metadata={"webhook_url": url})
    with sessions() as session:
        jobs.cancel(session, "job1")
    answers["hooks.test"] = "10.1.2.3"  # rebound
    await run_pass(settings, sessions)
    [row] = deliveries(sessions)
    assert listener.received == [] and row.status == "failed" and "(10.1.2.3)" in row.last_error

    # Resolving to an address taken as public (here the listener's), the request goes to that
    # address, with the name in Host: hooks.test itself resolves nowhere outside this test.
    monkeypatch.setattr(webhook_urls, "is_public", lambda address: True)
    answers["hooks.test"] = "127.0.0.1"
    make_job(sessions, "job2", metadata={"webhook_url": url})
    with sessions() as session:
        jobs.cancel(session, "job2")
    await run_pass(settings, sessions)
    [received] = listener.received
    assert (received.path, received.headers["host"]) == ("/rebind", f"hooks.test:{listener.port}")
    assert deliveries(sessions, "job2")[0].status == "delivered"


async def test_a_checked_https_address_is_verified_as_its_name(make_env, tmp_path, monkeypatch):
    """Over TLS, the request to the checked address still sends the name (SNI) and checks the
    server's certificate against it: a name the certificate does not cover gets nothing."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=hooks.test", "-addext", "subjectAltName=DNS:hooks.test"],
                   check=True, capture_output=True)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    monkeypatch.setattr(webhook_urls, "resolve", lambda host, port: ["127.0.0.1"])
    monkeypatch.setattr(webhook_urls, "is_public", lambda address: True)
    settings, sessions = make_env(webhook_allowed_hosts="*")
    with Listener(tls=server_tls) as listener:
        make_job(sessions, "named", metadata={"webhook_url": f"https://hooks.test:{listener.port}/x"})
        make_job(sessions, "other", metadata={"webhook_url": f"https://other.test:{listener.port}/x"})
        for job_id in ("named", "other"):
            with sessions() as session:
                jobs.cancel(session, job_id)
        # The node's client, trusting this test's certificate.
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert)), trust_env=False,
                                     limits=httpx.Limits(max_keepalive_connections=0)) as client:
            assert await WebhookSender(sessions, settings, client).run_pass() == 2
        [received] = listener.received
    assert received.headers["host"] == f"hooks.test:{listener.port}"
    assert deliveries(sessions, "named")[0].status == "delivered"
    other = deliveries(sessions, "other")[0]
    assert other.status == "pending" and "certificate" in other.last_error.lower()


# --- one claim per row, across nodes ---


def test_concurrent_claims_never_share_a_row(make_env):
    settings, sessions = make_env(webhook_url="https://hooks.example.com/x")
    for i in range(8):
        make_job(sessions, f"job{i}")
        with sessions() as session:
            jobs.cancel(session, f"job{i}")
    start, claimed, errors = threading.Barrier(4), [], []

    def node():
        start.wait()
        try:
            with sessions() as session:
                for _ in range(4):  # small batches, so that the nodes' claims interleave
                    claimed.extend(claim.id for claim in claim_due(session, lease=timedelta(minutes=5), limit=2))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(claimed) == len(set(claimed)) == 8
    assert {row.attempts for row in deliveries(sessions)} == {1}


def test_a_claim_whose_lease_ran_out_records_nothing(make_env):
    """The row came due again and another node claimed it: the first attempt's outcome is not written."""
    settings, sessions = make_env(webhook_url="https://hooks.example.com/x")
    make_job(sessions)
    with sessions() as session:
        jobs.cancel(session, "job1")
        [first] = claim_due(session, lease=timedelta(seconds=-1))  # a lease already over
        [second] = claim_due(session, lease=timedelta(minutes=5))
        assert (first.attempt, second.attempt) == (1, 2)
        assert not record(session, first, Outcome(True, "HTTP 200"), max_attempts=5, backoff_base_s=1)
        assert record(session, second, Outcome(True, "HTTP 200"), max_attempts=5, backoff_base_s=1)
    assert webhook_messages(sessions, "job1") == [
        "webhook fine_tuning.job.cancelled to https://hooks.example.com delivered (HTTP 200, attempt 2)"]


async def test_two_nodes_delivering_at_once_send_each_event_once(make_env, listener):
    settings, sessions = make_env(webhook_url=listener.url)
    for i in range(30):
        make_job(sessions, f"job{i:02d}")
        with sessions() as session:
            jobs.cancel(session, f"job{i:02d}")
    _, other_node = make_env(webhook_url=listener.url)
    while any(row.status == "pending" for row in deliveries(sessions)):
        await asyncio.gather(run_pass(settings, sessions), run_pass(settings, other_node))
    ids = [received.headers["webhook-id"] for received in listener.received]
    assert len(ids) == len(set(ids)) == 30
    assert {(row.status, row.attempts) for row in deliveries(sessions)} == {("delivered", 1)}
