"""The registry on SQLite and on the local PostgreSQL server, migrated by Alembic."""

import pytest
import torch
from sqlalchemy import inspect

from app import registry
from app.adapter_files import read_prompt_embeddings


def add(session, adapters_dir, name, rows=3):
    return registry.register_adapter(
        session, adapters_dir=adapters_dir, name=name, prompt_embeddings=torch.randn(rows, 8),
        base_fingerprint="base@1", base_model_name="base", source="trained", metrics={"eval_accuracy": 0.9},
        template="Review: {input}\nSentiment:",
    )


def test_migration_creates_the_adapters_table(sessions):
    with sessions() as session:
        columns = {c["name"] for c in inspect(session.get_bind()).get_columns("adapters")}
    assert {"id", "name", "base_fingerprint", "num_virtual_tokens", "sha256", "size_bytes", "source",
            "metrics", "created_at"} <= columns


def test_register_get_list_delete(sessions, tmp_path):
    with sessions() as session:
        first = add(session, tmp_path, "sst2-a")
        add(session, tmp_path, "sst2-b", rows=5)
        add(session, tmp_path, "agnews")
    with sessions() as session:
        got = registry.get_adapter(session, first.id)
        assert got.metrics == {"eval_accuracy": 0.9} and got.num_virtual_tokens == 3
        assert got.created_at.tzinfo is not None
        assert read_prompt_embeddings(registry.adapter_dir(tmp_path, first.id)).shape == (3, 8)
        items, total = registry.list_adapters(session, name="SST2", limit=1, offset=0)
        assert total == 2 and [a.name for a in items] == ["sst2-b"]
        registry.delete_adapter(session, adapters_dir=tmp_path, adapter=got)
    with sessions() as session:
        assert registry.get_adapter(session, first.id) is None
        assert registry.list_adapters(session)[1] == 2
    assert not registry.adapter_dir(tmp_path, first.id).exists()


def test_failed_insert_leaves_no_files(sessions, tmp_path):
    adapters_dir = tmp_path / "adapters"
    with sessions() as session:
        kept = add(session, adapters_dir, "one")
    with sessions() as session, pytest.raises(Exception, match="(?i)null"):
        registry.register_adapter(  # source is NOT NULL: the insert fails after the file was written
            session, adapters_dir=adapters_dir, name="broken", prompt_embeddings=torch.randn(2, 8),
            base_fingerprint="base@1", base_model_name="base", source=None,
        )
    assert [p.name for p in adapters_dir.iterdir()] == [kept.id]
    with sessions() as session:
        assert registry.list_adapters(session)[1] == 1
