"""Checkpoint pruning: once a job has ended, its checkpoints beyond the last KEEP_LAST and the
best go, adapter row and files together (app.registry). The run that ends a job prunes at once;
job upkeep (app.job_upkeep) catches jobs that ended otherwise (cancelled while paused, failed
by the reaper) or whose run stopped before it could."""

from sqlalchemy.orm import Session

from app import jobs, registry
from app.storage import Storage

KEEP_LAST = 3


def prune(session: Session, storage: Storage, job_id: str) -> list[str]:
    """Delete the ended job's surplus checkpoints; returns their adapter ids. Safe to repeat and
    to run on several nodes at once (a checkpoint already gone is skipped)."""
    pruned = []
    for checkpoint in jobs.prunable_checkpoints(session, job_id, KEEP_LAST):
        adapter = registry.get_adapter(session, checkpoint.adapter_id)
        session.delete(checkpoint)
        if adapter is None:  # deleted through the adapter routes meanwhile
            session.commit()
        else:
            registry.delete_adapter(session, storage=storage, adapter=adapter)  # commits the checkpoint's delete too
        pruned.append(checkpoint.adapter_id)
    return pruned
