"""Schema versions: a database written by an older schema opens and is migrated in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee as pw
import pytest

from webaims_tui.engine import db

V1_DUMP = Path(__file__).parent.parent / "data" / "schema_v1.sql"


def _database_from_dump(tmp_path: Path) -> Path:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.executescript(V1_DUMP.read_text())
    return path


def test_every_version_has_a_migration() -> None:
    assert sorted(db.MIGRATIONS) == list(range(1, db.SCHEMA_VERSION))


def test_a_version_1_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = _database_from_dump(tmp_path)
    opened = db.open_database(f"sqlite:///{path}")
    try:
        assert db.schema_version(opened) == db.SCHEMA_VERSION
        instance = db.Instance.get(db.Instance.sop_instance_uid == "1.2.3.4.5")
        assert instance.series.study.patient.patient_id == "ANON0001"
        assert instance.archive_path == "ANON0001/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
        assert db.RemoteNode.get().ae_title == "PACS"
        # Every current model can be queried: its table and columns exist.
        for model in db.MODELS:
            model.select().count()
    finally:
        opened.close()


def test_a_database_from_a_newer_program_is_refused(tmp_path: Path) -> None:
    path = _database_from_dump(tmp_path)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO schema_info (version, migrated_at) VALUES (999, '2030-01-01')"
        )
    with pytest.raises(db.DatabaseVersionError, match="newer than this program"):
        db.open_database(f"sqlite:///{path}")


def test_a_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE something (id INTEGER)")
    with pytest.raises(db.DatabaseVersionError, match="not a webaims-tui database"):
        db.open_database(f"sqlite:///{path}")


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    opened = db.open_database(f"sqlite:///{tmp_path / 'new.sqlite3'}")
    try:
        assert isinstance(opened, pw.SqliteDatabase)
        assert opened.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert opened.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        opened.close()
