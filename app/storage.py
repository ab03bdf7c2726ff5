"""Shared storage for adapter weights, uploaded datasets and the saved states of training runs:
named files under server-made keys ("adapters/<adapter id>", "datasets/<job id>",
"train-states/<job id>-<step>", "files/<file id>" for `POST /v1/files`), which every node reads alike. Two backends:

- database (the default): a table of blobs in the registry's own database, so a shared
  DATABASE_URL is all a cluster needs, and a row and its files commit in one transaction;
- directory: a folder (a shared volume), laid out as `<root>/<key>/<name>`, as DATA_DIR was
  before: an install that keeps its files there needs no move.

Keys and names are made by the server and checked here again: nothing a client sends becomes one.
"""

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import StoredFile

ADAPTERS, DATASETS, TRAIN_STATES, FILES = "adapters", "datasets", "train-states", "files"
_KEY = re.compile(rf"({ADAPTERS}|{DATASETS}|{TRAIN_STATES}|{FILES})/[A-Za-z0-9_-]{{1,64}}")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def adapter_key(adapter_id: str) -> str:
    return _checked(f"{ADAPTERS}/{adapter_id}")


def dataset_key(job_id: str) -> str:
    return _checked(f"{DATASETS}/{job_id}")


def file_key(file_id: str) -> str:
    """Where an uploaded file (app.uploaded_files) is kept: its normalised dataset."""
    return _checked(f"{FILES}/{file_id}")


def train_state_key(job_id: str, step: int) -> str:
    """Where a run of the job keeps its state after `step` (worker.train_state)."""
    return _checked(f"{TRAIN_STATES}/{job_id}-{step:09d}")


def train_state_job(key: str) -> tuple[str, int]:
    """The job and step of a train_state_key."""
    job_id, step = key.removeprefix(f"{TRAIN_STATES}/").rsplit("-", 1)
    return job_id, int(step)


def _checked(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def _checked_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a stored file name: {name!r}")
    return name


class NotStored(LookupError):
    """Nothing is stored under the key (never stored, or deleted meanwhile)."""


class Storage(ABC):
    """Files under keys. Writes and deletes join the caller's database transaction: a registry
    row and its files are committed together, or neither is (see `storing` and `deleting`)."""

    @abstractmethod
    @contextmanager
    def storing(self, session: Session, key: str, files: Mapping[str, bytes]) -> Iterator[None]:
        """Store `files` under the new `key` with the transaction the block commits (the block
        must end with the commit). If the block raises, the session is rolled back and nothing
        stays stored."""

    @abstractmethod
    @contextmanager
    def deleting(self, session: Session, key: str) -> Iterator[None]:
        """Delete the key's files with the transaction the block commits. If the block raises,
        the session is rolled back and the files stay."""

    @abstractmethod
    def read(self, key: str, name: str) -> bytes:
        """One file; NotStored if it is not there."""

    @abstractmethod
    def read_all(self, key: str) -> dict[str, bytes]:
        """Every file under the key, by name; NotStored if there is none."""

    @abstractmethod
    def keys(self, kind: str) -> list[str]:
        """The stored keys of a kind (ADAPTERS or DATASETS)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the key's files on their own, in a transaction of their own (no row goes with them)."""


class DatabaseStorage(Storage):
    """Blobs in the `stored_files` table of the registry's database."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    @contextmanager
    def storing(self, session, key, files):
        session.add_all(StoredFile(key=_checked(key), name=_checked_name(name), data=data) for name, data in files.items())
        try:
            yield
        except BaseException:
            session.rollback()  # the pending blobs go with the rest of the transaction
            raise

    @contextmanager
    def deleting(self, session, key):
        session.execute(delete(StoredFile).where(StoredFile.key == _checked(key)))
        try:
            yield
        except BaseException:
            session.rollback()
            raise

    def read(self, key, name):
        with self.sessions() as session:
            data = session.scalar(select(StoredFile.data).where(StoredFile.key == key, StoredFile.name == name))
        if data is None:
            raise NotStored(f"{key}/{name}")
        return data

    def read_all(self, key):
        with self.sessions() as session:
            files = dict(session.execute(select(StoredFile.name, StoredFile.data).where(StoredFile.key == key)).all())
        if not files:
            raise NotStored(key)
        return files

    def keys(self, kind):
        query = select(StoredFile.key).where(StoredFile.key.startswith(f"{kind}/", autoescape=True)).distinct()
        with self.sessions() as session:
            return list(session.scalars(query))

    def delete(self, key):
        with self.sessions() as session, session.begin():
            session.execute(delete(StoredFile).where(StoredFile.key == _checked(key)))


class DirectoryStorage(Storage):
    """Files under `root/<key>/`. A key's folder appears whole (written aside, then renamed) before
    its row is committed, and goes only after its row's delete is: a stale folder is harmless, a
    row without its files is not."""

    def __init__(self, root: Path):
        self.root = root

    def _folder(self, key: str) -> Path:
        return self.root / _checked(key)

    @contextmanager
    def storing(self, session, key, files):
        folder = self._folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
        try:
            for name, data in files.items():
                (staging / _checked_name(name)).write_bytes(data)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            yield
        except BaseException:
            session.rollback()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @contextmanager
    def deleting(self, session, key):
        folder = self._folder(key)
        try:
            yield
        except BaseException:
            session.rollback()
            raise
        shutil.rmtree(folder, ignore_errors=True)

    def read(self, key, name):
        try:
            return (self._folder(key) / _checked_name(name)).read_bytes()
        except FileNotFoundError:
            raise NotStored(f"{key}/{name}") from None

    def read_all(self, key):
        try:
            files = {path.name: path.read_bytes() for path in self._folder(key).iterdir() if path.is_file()}
        except FileNotFoundError:
            files = {}
        if not files:
            raise NotStored(key)
        return files

    def keys(self, kind):
        folder = self.root / kind
        if not folder.is_dir():
            return []
        return [f"{kind}/{path.name}" for path in folder.iterdir() if _KEY.fullmatch(f"{kind}/{path.name}")]

    def delete(self, key):
        shutil.rmtree(self._folder(key), ignore_errors=True)


def make_storage(settings: Settings, sessions: sessionmaker[Session]) -> Storage:
    """The backend STORAGE names; it touches neither disk nor database until it is used."""
    if settings.storage == "directory":
        return DirectoryStorage(settings.storage_dir)
    return DatabaseStorage(sessions)
