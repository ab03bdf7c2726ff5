"""An install from before shared storage (adapters and datasets as files under DATA_DIR) upgrades:
Alembic adds the blob table, `python -m app.cli move-files-to-database` moves the files in, and
the adapters serve exactly as they did from the files."""

import json
import os
import subprocess
import sys

from alembic import command
from sqlalchemy import text

from app.adapter_files import content_sha256, encode_adapter
from app.datasets import Example, to_jsonl
from app.db import make_engine, make_session_factory
from app.models import Adapter
from app.storage import ADAPTERS, DATASETS, DatabaseStorage, adapter_key
from app.storage_move import move_files_to_database, unmoved_folders
from app.train_config import TrainConfig
from tests.conftest import REPO, alembic_config, random_soft_prompt


def install_the_old_way(data_dir, sessions, base) -> dict[str, object]:
    """What nodes before migration 0007 left: each adapter's files under DATA_DIR/adapters/<id>/
    (then its row), each job's dataset under DATA_DIR/datasets/<job>/. Returns the prompts by id."""
    prompts = {f"old{seed:09d}": random_soft_prompt(base, 3 + seed, seed) for seed in range(3)}
    with sessions() as session:
        for adapter_id, prompt in prompts.items():
            files = encode_adapter(prompt, base.fingerprint, base.name)
            folder = data_dir / "adapters" / adapter_id
            folder.mkdir(parents=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
            session.add(Adapter(id=adapter_id, name=adapter_id, base_fingerprint=base.fingerprint,
                                num_virtual_tokens=prompt.shape[0], sha256=content_sha256(prompt),
                                size_bytes=sum(map(len, files.values())), source="imported", metrics={}))
        session.commit()
        # Rows as the schema of migration 0006 has them (today's model has columns it lacks).
        for job_id, status in (("queuedjob", "queued"), ("endedjob", "cancelled")):
            (data_dir / "datasets" / job_id).mkdir(parents=True)
            (data_dir / "datasets" / job_id / "train.jsonl").write_bytes(to_jsonl([Example("in", "out")]))
            session.execute(text(
                "INSERT INTO train_jobs (id, name, status, params, dataset_path, train_examples, validation_examples,"
                " step, total_steps, epoch, attempts, cancel_requested, created_at) VALUES (:id, :id, :status,"
                " :params, :path, 1, 0, 0, 0, 0, 0, 0, CURRENT_TIMESTAMP)"),
                {"id": job_id, "status": status, "params": json.dumps(TrainConfig().to_dict()),
                 "path": f"datasets/{job_id}"})
        session.commit()
    (data_dir / "adapters" / "orphan").mkdir()  # a folder whose row was deleted: not the move's to judge
    return prompts


def greedy_outputs(client, adapter_ids) -> dict[str, str]:
    outputs = {}
    for adapter_id in adapter_ids:
        response = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "a fine film", "max_new_tokens": 8,
                                                  "temperature": 0})
        assert response.status_code == 200, response.text
        outputs[adapter_id] = response.json()["text"]
    return outputs


def test_an_install_with_files_is_migrated_and_serves_the_same_outputs(tmp_path, make_client, tiny_base):
    url = f"sqlite:///{tmp_path / 'old-install.db'}"
    data_dir = tmp_path / "data"  # make_client's DATA_DIR
    command.upgrade(alembic_config(url), "0006")
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    prompts = install_the_old_way(data_dir, sessions, tiny_base)
    assert unmoved_folders(data_dir) == 6  # what a node's startup warns about
    command.upgrade(alembic_config(url), "head")

    # With STORAGE=directory on DATA_DIR the files serve where they are, no move needed.
    before = greedy_outputs(make_client(tiny_base, database_url=url, storage="directory"), prompts)
    # An earlier move that stopped halfway left a copy of one adapter in the database (and its folder).
    storage = DatabaseStorage(sessions)
    with sessions() as session, storage.storing(session, adapter_key("old000000001"), {"partial": b"x"}):
        session.commit()

    environment = os.environ | {"DATA_DIR": str(data_dir), "DATABASE_URL": url}
    moved = subprocess.run([sys.executable, "-m", "app.cli", "move-files-to-database"], cwd=REPO, env=environment,
                           capture_output=True, text=True, timeout=300, check=False)
    assert moved.returncode == 0, moved.stderr
    assert "moved 3 adapters and 1 datasets" in moved.stdout and "deleted 1 datasets of ended jobs" in moved.stdout
    assert f"left {data_dir / 'adapters' / 'orphan'}" in moved.stdout

    # The files are gone, the blobs are there, and a second run has nothing left to do.
    assert [p.name for p in (data_dir / "adapters").iterdir()] == ["orphan"] and unmoved_folders(data_dir) == 1
    assert list((data_dir / "datasets").iterdir()) == []
    assert sorted(storage.keys(ADAPTERS)) == sorted(adapter_key(i) for i in prompts)
    assert storage.keys(DATASETS) == ["datasets/queuedjob"]
    assert set(storage.read_all(adapter_key("old000000001"))) == {"adapter_config.json", "adapter_model.safetensors"}
    again = move_files_to_database(data_dir=data_dir, sessions=sessions)
    assert (again.adapters, again.datasets, again.ended_datasets) == (0, 0, 0)

    # The database backend (the default) serves them exactly as the files did.
    after_client = make_client(tiny_base, database_url=url)
    assert after_client.app.state.runtime.settings.storage == "database"
    assert greedy_outputs(after_client, prompts) == before
    assert after_client.get("/adapters/old000000000/download").status_code == 200
    engine.dispose()


def test_the_move_refuses_a_directory_install_and_an_unmigrated_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    command.upgrade(alembic_config(url), "0006")
    base_env = os.environ | {"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": url}
    for extra, message in (({"STORAGE": "directory"}, "STORAGE=directory"), ({}, "alembic upgrade head")):
        run = subprocess.run([sys.executable, "-m", "app.cli", "move-files-to-database"], cwd=REPO,
                             env=base_env | extra, capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode != 0 and message in run.stderr, run.stderr
