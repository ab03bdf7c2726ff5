"""The registry on SQLite and on the local PostgreSQL server, migrated by Alembic, with its files
in each storage backend."""

import pytest
import torch
from sqlalchemy import inspect

from app import registry
from app.adapter_files import WEIGHTS_NAME, read_served
from app.storage import ADAPTERS, NotStored, adapter_key


def add(session, storage, name, rows=3):
    return registry.register_adapter(
        session, storage=storage, name=name, prompt_embeddings=torch.randn(rows, 8),
        base_fingerprint="base@1", base_model_name="base", source="trained", metrics={"eval_accuracy": 0.9},
        template="Review: {input}\nSentiment:",
    )


def test_migration_creates_the_adapters_table(sessions):
    with sessions() as session:
        columns = {c["name"] for c in inspect(session.get_bind()).get_columns("adapters")}
    assert {"id", "name", "base_fingerprint", "num_virtual_tokens", "sha256", "size_bytes", "source",
            "metrics", "created_at"} <= columns


def test_register_get_list_delete(sessions, storage):
    with sessions() as session:
        first = add(session, storage, "sst2-a")
        add(session, storage, "sst2-b", rows=5)
        add(session, storage, "agnews")
    with sessions() as session:
        got = registry.get_adapter(session, first.id)
        assert got.metrics == {"eval_accuracy": 0.9} and got.num_virtual_tokens == 3
        assert got.created_at.tzinfo is not None
        assert read_served(storage.read_all(adapter_key(first.id)))[0].shape == (3, 8)
        assert got.size_bytes == sum(len(data) for data in storage.read_all(adapter_key(first.id)).values())
        items, total = registry.list_adapters(session, name="SST2", limit=1, offset=0)
        assert total == 2 and [a.name for a in items] == ["sst2-b"]
        registry.delete_adapter(session, storage=storage, adapter=got)
    with sessions() as session:
        assert registry.get_adapter(session, first.id) is None
        assert registry.list_adapters(session)[1] == 2
    assert adapter_key(first.id) not in storage.keys(ADAPTERS) and len(storage.keys(ADAPTERS)) == 2
    with pytest.raises(NotStored):
        storage.read(adapter_key(first.id), WEIGHTS_NAME)


def test_failed_insert_leaves_no_files(sessions, storage):
    with sessions() as session:
        kept = add(session, storage, "one")
    with sessions() as session, pytest.raises(Exception, match="(?i)null"):
        registry.register_adapter(  # source is NOT NULL: the commit fails after the files were stored
            session, storage=storage, name="broken", prompt_embeddings=torch.randn(2, 8),
            base_fingerprint="base@1", base_model_name="base", source=None,
        )
    assert storage.keys(ADAPTERS) == [adapter_key(kept.id)]
    with sessions() as session:
        assert registry.list_adapters(session)[1] == 1
