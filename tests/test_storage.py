"""Shared storage, each backend on SQLite and on PostgreSQL: files under server-made keys, written
and deleted together with the registry rows of the same transaction, or not at all."""

import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.models import Adapter
from app.storage import (
    ADAPTERS,
    DATASETS,
    DatabaseStorage,
    DirectoryStorage,
    NotStored,
    adapter_key,
    dataset_key,
    make_storage,
)

FILES = {"train.jsonl": b'{"input": "a", "output": "b"}\n', "validation.jsonl": b"\x00\xff binary is fine"}


def adapter_row(adapter_id: str, source: str | None = "imported") -> Adapter:
    return Adapter(id=adapter_id, name="a", base_fingerprint="base@1", num_virtual_tokens=1, sha256="0" * 64,
                   size_bytes=1, source=source, metrics={})


def rows(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Adapter))


def test_store_read_list_delete(sessions, storage):
    with sessions() as session, storage.storing(session, dataset_key("job1"), FILES):
        session.commit()
    with sessions() as session, storage.storing(session, adapter_key("ad1"), {"w": b"1"}):
        session.commit()
    assert storage.read(dataset_key("job1"), "train.jsonl") == FILES["train.jsonl"]
    assert storage.read_all(dataset_key("job1")) == FILES
    assert storage.keys(DATASETS) == ["datasets/job1"] and storage.keys(ADAPTERS) == ["adapters/ad1"]
    storage.delete(dataset_key("job1"))
    assert storage.keys(DATASETS) == []
    for read in (lambda: storage.read(dataset_key("job1"), "train.jsonl"), lambda: storage.read_all(dataset_key("job1")),
                 lambda: storage.read(adapter_key("ad1"), "other")):
        with pytest.raises(NotStored):
            read()
    storage.delete(dataset_key("never"))  # deleting what is not there is no error


def test_a_row_and_its_files_commit_together(sessions, storage):
    with sessions() as session, storage.storing(session, adapter_key("kept"), {"w": b"1"}):
        session.add(adapter_row("kept"))
        session.commit()
    assert rows(sessions) == 1 and storage.read(adapter_key("kept"), "w") == b"1"


def test_a_failing_commit_leaves_neither_row_nor_files(sessions, storage):
    with pytest.raises(Exception, match="(?i)null"), sessions() as session, \
            storage.storing(session, adapter_key("broken"), {"w": b"1"}):
        session.add(adapter_row("broken", source=None))  # NOT NULL: the commit itself fails
        session.commit()
    assert rows(sessions) == 0 and storage.keys(ADAPTERS) == []


def test_a_block_that_fails_before_its_commit_leaves_neither(sessions, storage):
    with pytest.raises(RuntimeError), sessions() as session, storage.storing(session, adapter_key("crash"), {"w": b"1"}):
        session.add(adapter_row("crash"))
        session.flush()  # the row (and the blobs) sent, not committed
        raise RuntimeError("the node stops here")
    assert rows(sessions) == 0 and storage.keys(ADAPTERS) == []
    with pytest.raises(NotStored):
        storage.read(adapter_key("crash"), "w")


def test_a_row_and_its_files_are_deleted_together(sessions, storage):
    with sessions() as session, storage.storing(session, adapter_key("a1"), {"w": b"1"}):
        session.add(adapter_row("a1"))
        session.commit()
    with pytest.raises(RuntimeError), sessions() as session, storage.deleting(session, adapter_key("a1")):
        session.delete(session.get(Adapter, "a1"))
        session.flush()
        raise RuntimeError("failed before the commit")
    assert rows(sessions) == 1 and storage.read(adapter_key("a1"), "w") == b"1"  # both stay
    with sessions() as session, storage.deleting(session, adapter_key("a1")):
        session.delete(session.get(Adapter, "a1"))
        session.commit()
    assert rows(sessions) == 0 and storage.keys(ADAPTERS) == []


@pytest.mark.parametrize("key", ["../etc", "adapters/../../x", "adapters/", "adapters/a/b", "other/x", "adapters/.x",
                                 "adapters/" + "a" * 65])
def test_only_server_made_keys_are_accepted(sessions, storage, key):
    with pytest.raises(ValueError, match="not a storage key"), sessions() as session, storage.storing(session, key, {"w": b""}):
        session.commit()
    with pytest.raises(ValueError, match="not a storage key"):
        adapter_key(key)


@pytest.mark.parametrize("name", ["../w", ".hidden", "a/b", ""])
def test_only_plain_file_names_are_accepted(sessions, storage, name):
    with pytest.raises(ValueError, match="not a stored file name"), sessions() as session, \
            storage.storing(session, adapter_key("a1"), {name: b""}):
        session.commit()
    assert storage.keys(ADAPTERS) == []


def test_the_directory_backend_keeps_the_data_dir_layout(tmp_path, sqlite_url):
    """An install that kept its files under DATA_DIR reads them in place with STORAGE=directory."""
    storage = make_storage(Settings(data_dir=tmp_path, database_url=sqlite_url, storage="directory"), sessions=None)
    assert isinstance(storage, DirectoryStorage) and storage.root == tmp_path
    (tmp_path / "adapters" / "abc").mkdir(parents=True)
    (tmp_path / "adapters" / "abc" / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / "adapters" / ".staging-x1").mkdir()  # a write interrupted before its rename
    assert storage.keys(ADAPTERS) == ["adapters/abc"] and storage.read("adapters/abc", "adapter_model.safetensors") == b"w"
    shared = make_storage(Settings(data_dir=tmp_path, database_url=sqlite_url, storage="directory",
                                   storage_dir=tmp_path / "nfs"), sessions=None)
    assert shared.root == tmp_path / "nfs"
    assert isinstance(make_storage(Settings(data_dir=tmp_path, database_url=sqlite_url), sessions=None), DatabaseStorage)
