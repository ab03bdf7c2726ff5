"""Job upkeep: the chores that keep the registry's training jobs moving when a worker, a process
or the broker lets them down, and that clear away what ended jobs leave behind. The API node's
reaper loop (app.runtime) runs a pass of them every so often.

Each chore is safe to repeat and to run on several nodes at once: the registry's conditional
updates (app.jobs) decide, and a message more than needed is harmless. A pass runs the chores one by one, each on its own,
so one failing (a broker outage) never stops the others.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from app import checkpoints, jobs
from app.storage import DATASETS, TRAIN_STATES, Storage, train_state_job

log = logging.getLogger(__name__)


@dataclass
class JobUpkeep:
    sessions: sessionmaker[Session]
    storage: Storage
    send: Callable[[str], None]  # sends a job's message to the broker and records that it was sent
    # A running job's heartbeat older than this: its worker is gone. A new job with no message
    # this long after it was made: its send failed.
    stale_after: timedelta
    resend_after: timedelta  # a sent job still unclaimed after this: its message may be lost
    max_attempts: int

    def reap_stale_jobs(self) -> list[str]:
        """Requeue or fail jobs whose worker stopped heartbeating; send_unsent_jobs sends the requeued."""
        with self.sessions() as session:
            requeued = jobs.reap_stale(session, stale_after=self.stale_after, max_attempts=self.max_attempts,
                                       alive=jobs.live_runs.snapshot())
        for job_id in requeued:
            log.warning("job %s lost its worker; queued again", job_id)
        return requeued

    def send_unsent_jobs(self) -> list[str]:
        """Send a message for each queued job that has none in the broker (see jobs.unsent)."""
        with self.sessions() as session:
            due = jobs.unsent(session, unsent_after=self.stale_after, resend_after=self.resend_after)
        for job_id in due:  # a broker still down raises here; the next pass tries again
            self.send(job_id)
            log.warning("job %s was queued with no message in the broker; sent", job_id)
        return due

    def delete_ended_job_files(self) -> list[str]:
        """Delete the uploaded datasets and saved run states of jobs that have ended: only a run
        reads them."""
        datasets, states = self.storage.keys(DATASETS), self.storage.keys(TRAIN_STATES)
        if not datasets and not states:
            return []
        with self.sessions() as session:
            ended = jobs.ended_datasets(session, datasets) if datasets else []
            ended_jobs = jobs.ended_jobs(session, {train_state_job(key)[0] for key in states})
        ended += [key for key in states if train_state_job(key)[0] in ended_jobs]
        for key in ended:
            self.storage.delete(key)
        return ended

    def prune_ended_checkpoints(self) -> list[str]:
        """Prune the checkpoints of ended jobs that keep more than they should (app.checkpoints);
        returns the pruned adapter ids. Paused jobs have not ended: theirs stay."""
        pruned: list[str] = []
        with self.sessions() as session:
            for job_id in jobs.ended_jobs_with_checkpoints_over(session, checkpoints.KEEP_LAST):
                pruned += checkpoints.prune(session, self.storage, job_id)
        return pruned

    async def run_pass(self) -> None:
        """Each chore once, off the event loop; a failure is logged and the next chore runs."""
        for chore in (self.reap_stale_jobs, self.send_unsent_jobs, self.delete_ended_job_files,
                      self.prune_ended_checkpoints):
            try:
                await asyncio.to_thread(chore)
            except Exception:
                log.exception("job reaper: %s failed", chore.__name__)
