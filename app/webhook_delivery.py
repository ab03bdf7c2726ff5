"""Webhook delivery: every node runs a loop that claims the due deliveries (app.webhooks writes
them), POSTs each, signed in the Standard Webhooks form, and records the outcome. So a job's event
goes out from whichever node is up, whichever node ended the job.

At least once: a claim moves the row's next attempt a lease ahead and counts the attempt, in one
conditional update (the attempts it saw), so two nodes never both win one; a node that dies
mid-attempt leaves the row to come due again when the lease ends. A 2xx answer delivers it; any
other outcome is retried after an exponential backoff, up to WEBHOOK_MAX_ATTEMPTS, and then given
up. Every attempt's outcome is a message on the job's events.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast
from urllib.parse import urlsplit

import httpx
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from app import jobs
from app.config import Settings
from app.models import WebhookDelivery, utcnow
from app.webhook_urls import Refused, destination

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0  # how often a node looks for due deliveries (one indexed query)
BATCH = 20  # deliveries one pass claims, sent concurrently
MAX_BACKOFF_S = 3600.0
USER_AGENT = "softserve-webhooks"


@dataclass(frozen=True)
class Claim:
    """One attempt at one delivery, won by this node."""

    id: str
    job_id: str
    event_type: str
    url: str
    payload: dict
    attempt: int  # 1 for the first


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    detail: str  # "HTTP 200", or what went wrong
    final: bool = False  # no point in trying again (the URL is refused)


def backoff_s(attempt: int, base_s: float) -> float:
    """The wait after the `attempt`th failed attempt: base, 2 x base, 4 x base ..., at most an hour."""
    return min(base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


def origin(url: str) -> str:
    """The URL as the job's events show it: its path and query, and any credentials, may carry a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _rows_updated(session: Session, statement) -> int:
    return cast(CursorResult, session.execute(statement)).rowcount


def claim_due(session: Session, *, lease: timedelta, limit: int = BATCH) -> list[Claim]:
    """Claim up to `limit` pending deliveries whose next attempt is due. On PostgreSQL the rows are
    locked as they are read, skipping those another node has locked; on every backend the claim's
    conditional update decides, so a row another node claimed first is left to it."""
    now = utcnow()
    due = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.job_id, WebhookDelivery.event_type, WebhookDelivery.url,
               WebhookDelivery.payload, WebhookDelivery.attempts)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(limit)
        .with_for_update(skip_locked=True)).all()
    claims = []
    for delivery_id, job_id, event_type, url, payload, attempts in due:
        if _rows_updated(session, update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == attempts).values(attempts=attempts + 1, next_attempt_at=now + lease)):
            claims.append(Claim(delivery_id, job_id, event_type, url, payload, attempts + 1))
    session.commit()
    return claims


def record(session: Session, claim: Claim, outcome: Outcome, *, max_attempts: int, backoff_base_s: float) -> bool:
    """The attempt's outcome, on the row and as a message on the job's events, in one transaction.
    False, and nothing written, if the claim no longer holds (its lease ran out and another node
    claimed the row again)."""
    where = f"webhook {claim.event_type} to {origin(claim.url)}"
    detail = jobs.storable(outcome.detail, 400)
    if outcome.delivered:
        values: dict = dict(status="delivered", delivered_at=utcnow(), last_error=None)
        message = f"{where} delivered ({outcome.detail}, attempt {claim.attempt})"
    elif outcome.final or claim.attempt >= max_attempts:
        values = dict(status="failed", last_error=detail)
        message = f"{where} given up after {claim.attempt} attempt(s): {detail}"
    else:
        delay = backoff_s(claim.attempt, backoff_base_s)
        values = dict(next_attempt_at=utcnow() + timedelta(seconds=delay), last_error=detail)
        message = f"{where}: attempt {claim.attempt} of {max_attempts} failed ({detail}); next in {delay:g} s"
    if not _rows_updated(session, update(WebhookDelivery).where(
            WebhookDelivery.id == claim.id, WebhookDelivery.status == "pending",
            WebhookDelivery.attempts == claim.attempt).values(**values)):
        session.rollback()
        return False
    jobs.add_event(session, claim.job_id, "message", message=message)
    session.commit()
    return True


class WebhookSender:
    """A node's deliveries: claim what is due, send it, record what came of it."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, client: httpx.AsyncClient) -> None:
        if not settings.webhook_secret:
            raise ValueError("webhooks are off without WEBHOOK_SECRET")
        self.sessions, self.settings, self.client = sessions, settings, client
        self.signer = Webhook(settings.webhook_secret)
        # An attempt, name resolution included, is cut off after WEBHOOK_TIMEOUT_S; the lease is
        # longer still (recording the outcome takes a moment), so a claim outlives its attempt
        # unless its node died.
        self.lease = timedelta(seconds=2 * settings.webhook_timeout_s + 60)
        self.in_flight: set[asyncio.Task] = set()  # the attempts under way, at most BATCH

    def _claim(self, limit: int) -> list[Claim]:
        with self.sessions() as session:
            return claim_due(session, lease=self.lease, limit=limit)

    def _record(self, claim: Claim, outcome: Outcome) -> None:
        with self.sessions() as session:
            recorded = record(session, claim, outcome, max_attempts=self.settings.webhook_max_attempts,
                              backoff_base_s=self.settings.webhook_backoff_base_s)
        if not recorded:
            log.warning("webhook %s: its claim ran out during the attempt; another node has it", claim.id)

    def signed_headers(self, message_id: str, body: str) -> dict[str, str]:
        timestamp = int(time.time())
        return {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": self.signer.sign(message_id, datetime.fromtimestamp(timestamp, UTC), body)}

    async def attempt(self, claim: Claim) -> Outcome:
        try:
            address = await asyncio.to_thread(destination, claim.url, self.settings)
        except Refused as exc:
            return Outcome(False, f"refused: {exc}", final=not exc.retry)
        body = json.dumps(claim.payload, separators=(",", ":"))
        headers = self.signed_headers(claim.id, body)
        url, extensions = httpx.URL(claim.url), {}
        if address is not None:
            # Connect to the address that was checked, not to whatever the name resolves to next
            # (DNS rebinding), while the server still sees its name (Host, and TLS's SNI and certificate).
            headers["host"] = url.netloc.decode("ascii")
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
            url = url.copy_with(host=address)
        try:
            # The answer's status is all that counts: its body is never read.
            async with self.client.stream("POST", url, content=body.encode(), headers=headers,
                                          extensions=extensions) as response:
                status = response.status_code
        except httpx.HTTPError as exc:
            return Outcome(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        return Outcome(200 <= status < 300, f"HTTP {status}")

    async def _deliver(self, claim: Claim) -> None:
        timeout_s = self.settings.webhook_timeout_s
        try:
            # httpx's timeout is per connect, write and read: a target that trickles its answer, or
            # a name that is slow to resolve, would outlast it (and the claim's lease) without this.
            outcome = await asyncio.wait_for(self.attempt(claim), timeout_s)
        except TimeoutError:
            outcome = Outcome(False, f"no answer within {timeout_s:g} s")
        except Exception as exc:  # recorded all the same, so that the attempts still count towards giving up
            log.exception("webhook %s: the attempt failed", claim.id)
            outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
        await asyncio.to_thread(self._record, claim, outcome)

    async def start_pass(self) -> list[asyncio.Task]:
        """Claim what is due, as many as there is room for beside the attempts under way, and start
        delivering it without waiting: a slow target holds up only its own delivery."""
        room = BATCH - len(self.in_flight)
        claims = await asyncio.to_thread(self._claim, room) if room > 0 else []
        tasks = [asyncio.create_task(self._deliver(claim)) for claim in claims]
        for task in tasks:
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        return tasks

    async def run_pass(self) -> int:
        """Claim what is due and deliver it, waiting for those attempts; returns how many were made."""
        tasks = await self.start_pass()
        await asyncio.gather(*tasks)
        return len(tasks)


def make_client(settings: Settings) -> httpx.AsyncClient:
    # No redirects (a redirect could lead anywhere, past the address checks); no proxies from the
    # environment (the checked address must be the one connected to); no kept connections (one to
    # an address, set up and verified for one name, must not carry a request for another).
    return httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_keepalive_connections=0))


async def deliver_forever(sessions: sessionmaker[Session], settings: Settings,
                          interval_s: float = POLL_INTERVAL_S) -> None:
    """A node's delivery loop (app.runtime starts it when WEBHOOK_SECRET is set). Cancelling it
    mid-attempt leaves the claimed rows to come due again when their leases end."""
    async with make_client(settings) as client:
        sender = WebhookSender(sessions, settings, client)
        try:
            while True:
                room = BATCH - len(sender.in_flight)
                try:
                    full = room > 0 and len(await sender.start_pass()) == room
                except Exception:
                    log.exception("webhook delivery pass failed")
                    full = False
                if not full:  # after a full claim more may be due already
                    await asyncio.sleep(interval_s)
        finally:  # the attempts under way end with the loop, before their client closes
            running = list(sender.in_flight)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
