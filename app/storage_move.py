"""The one-off move of an install's files into the database backend: adapter folders and the
datasets of jobs still to run, from DATA_DIR/adapters/<id>/ and DATA_DIR/datasets/<job>/, as
nodes kept them before shared storage (`python -m app.cli move-files-to-database`).

Each key is copied in a transaction of its own, replacing any copy an interrupted earlier run
made, and its folder is removed only once the copy is committed: running it again is safe.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import jobs
from app.models import Adapter, TrainJob
from app.storage import ADAPTERS, DATASETS, DatabaseStorage, adapter_key


@dataclass
class MoveReport:
    adapters: int = 0  # adapter folders moved into the database
    datasets: int = 0  # datasets of queued or running jobs moved
    ended_datasets: int = 0  # datasets of ended jobs, deleted: nothing reads them again
    left: list[Path] = field(default_factory=list)  # folders with no row in the registry, left alone


def _folders(parent: Path) -> list[Path]:
    return sorted(path for path in parent.iterdir() if path.is_dir()) if parent.is_dir() else []


def unmoved_folders(data_dir: Path) -> int:
    """How many adapter and dataset folders an install left under DATA_DIR (0 once moved)."""
    return len(_folders(data_dir / ADAPTERS)) + len(_folders(data_dir / DATASETS))


def _move(storage: DatabaseStorage, key: str, folder: Path) -> None:
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    with storage.sessions() as session, storage.deleting(session, key), storage.storing(session, key, files):
        session.commit()
    shutil.rmtree(folder)


def move_files_to_database(*, data_dir: Path, sessions: sessionmaker[Session]) -> MoveReport:
    storage, report = DatabaseStorage(sessions), MoveReport()
    with sessions() as session:
        adapter_ids = set(session.scalars(select(Adapter.id)))
        dataset_status = dict(session.execute(select(TrainJob.dataset_path, TrainJob.status)).all())
    for folder in _folders(data_dir / ADAPTERS):
        if folder.name in adapter_ids:
            _move(storage, adapter_key(folder.name), folder)
            report.adapters += 1
        else:  # a stale folder (its row deleted) or a write interrupted before its row: not ours to judge
            report.left.append(folder)
    for folder in _folders(data_dir / DATASETS):
        key, status = f"{DATASETS}/{folder.name}", dataset_status.get(f"{DATASETS}/{folder.name}")
        if status is None:
            report.left.append(folder)
        elif status in jobs.TERMINAL:
            shutil.rmtree(folder)
            report.ended_datasets += 1
        else:
            _move(storage, key, folder)
            report.datasets += 1
    return report
