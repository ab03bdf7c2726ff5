"""Every node runs the job reaper: several reapers at once on one PostgreSQL registry requeue or
fail each lost job exactly once."""

import threading
from datetime import timedelta

from app import jobs
from app.db import make_engine, make_session_factory
from app.models import utcnow
from tests.conftest import make_settings
from tests.worker.test_job_runner import queue_job


def test_reapers_on_several_nodes_handle_each_lost_job_once(tmp_path, postgres_url):
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    settings = make_settings(tmp_path, postgres_url)
    retried = [queue_job(settings, sessions, job_id=f"retry{i:02d}") for i in range(12)]
    failed = [queue_job(settings, sessions, job_id=f"fail{i:02d}") for i in range(6)]
    with sessions() as session:
        for job_id in retried + failed:
            jobs.claim(session, job_id, "lost-node")
            job = jobs.get_job(session, job_id)
            job.heartbeat_at = utcnow() - timedelta(minutes=5)  # its node died
            job.attempts = 2 if job_id in failed else 1
        session.commit()
    start, requeued, errors = threading.Barrier(4), [], []

    def reaper():
        with sessions() as session:
            start.wait()
            try:
                requeued.extend(jobs.reap_stale(session, stale_after=timedelta(seconds=60), max_attempts=2))
            except Exception as exc:  # a deadlock or a conflict would land here
                errors.append(exc)

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(requeued) == retried  # each requeued by exactly one reaper
    with sessions() as session:
        for job_id in retried + failed:
            job = jobs.get_job(session, job_id)
            assert job.status == ("queued" if job_id in retried else "failed")
            notes = [e for e in jobs.list_events(session, job_id) if "stopped responding" in e.data.get("message", "")]
            assert len(notes) == 1, (job_id, [e.data for e in notes])
    engine.dispose()
