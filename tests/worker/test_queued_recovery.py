"""A queued job whose message never reached the broker is sent by the reaper, once; a message
more than needed (a late original, a re-send) runs the job once. Real Redis, real registry."""

import base64
import json
from datetime import timedelta

import kombu.exceptions
import pytest
import redis

from app import jobs, registry
from app.models import utcnow
from tests.worker.test_job_runner import queue_job
from worker.job_runner import run_job

UNREACHABLE_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
LONG_AGO = timedelta(hours=2)


@pytest.fixture
def broker(redis_url):  # these tests read the broker's queue: it starts and ends empty
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def queued_messages(broker) -> list[str]:
    """The job ids of the train messages waiting in the broker, oldest first."""
    bodies = [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in reversed(broker.lrange("celery", 0, -1))]
    return [args[0] for args, _kwargs, _embed in bodies]


def age(sessions, job_id, **columns):
    """Move the job's timestamps back, as if time had passed."""
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        for column in columns:
            setattr(job, column, utcnow() - columns[column])
        session.commit()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


def api(make_client, tiny_base, broker_url, database_url=None):
    # A long stale timeout: the app's own reaper loop stays asleep; the test runs its passes.
    runtime = make_client(tiny_base, database_url, redis_url=broker_url, job_stale_after_s=3600).app.state.runtime
    return runtime, runtime.settings, runtime.sessions


def test_a_job_whose_message_never_left_is_sent_once_and_runs_once(make_client, tiny_base, broker, redis_url,
                                                                    database_url):
    runtime, settings, sessions = api(make_client, tiny_base, redis_url, database_url)
    lost = queue_job(settings, sessions, "lostmessage")  # committed; the process died before the send
    age(sessions, lost, created_at=LONG_AGO)
    fresh = queue_job(settings, sessions, "beingsent")  # committed just now; its API call is sending it
    assert runtime.job_upkeep.send_unsent_jobs() == [lost]
    assert runtime.job_upkeep.send_unsent_jobs() == []  # sent: not again
    assert queued_messages(broker) == [lost]

    # Still unclaimed long after its message was sent: the broker may have lost it; send again.
    age(sessions, lost, sent_at=timedelta(seconds=settings.job_resend_after_s + 1))
    assert runtime.job_upkeep.send_unsent_jobs() == [lost]
    # Both messages are delivered: the job runs once.
    outcomes = [run_job(job_id, settings=settings, sessions=sessions, base=tiny_base)
                for job_id in queued_messages(broker)]
    assert outcomes == ["succeeded", "skipped"]
    with sessions() as session:
        assert registry.list_adapters(session)[1] == 1
        assert jobs.get_job(session, fresh).sent_at is None  # never touched
    assert runtime.job_upkeep.send_unsent_jobs() == []


def test_a_requeue_whose_send_failed_is_sent_once_the_broker_answers(make_client, tiny_base, broker, redis_url):
    # Two API processes on one registry; the first one's broker is down when its reaper requeues.
    down, settings, sessions = api(make_client, tiny_base, UNREACHABLE_BROKER_URL)
    up = api(make_client, tiny_base, redis_url)[0]
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        assert jobs.claim(session, job_id, "worker-that-dies")
    age(sessions, job_id, created_at=LONG_AGO, heartbeat_at=LONG_AGO)

    assert down.job_upkeep.reap_stale_jobs() == [job_id]
    with pytest.raises(kombu.exceptions.OperationalError):
        down.job_upkeep.send_unsent_jobs()
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert (job.status, job.sent_at) == ("queued", None)
    assert up.job_upkeep.send_unsent_jobs() == [job_id]
    assert queued_messages(broker) == [job_id]
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"

