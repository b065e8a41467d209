"""Schema versions: a database written by an older schema opens and is migrated in place.

The version-1 database is ``tests/data/schema_v1.sql`` (a SQLite dump); with
WEBAIMS_TEST_DATABASE=postgresql the migration runs on PostgreSQL instead (tests/postgres.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import peewee as pw
import pytest

from tests.postgres import engine_tests_use_postgresql
from webaims_tui.engine import db

V1_DUMP = Path(__file__).parent.parent / "data" / "schema_v1.sql"


def _database_from_dump(tmp_path: Path) -> Path:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.executescript(V1_DUMP.read_text())
    return path


def _dump_tables() -> dict[str, tuple[list[str], list[tuple[object, ...]]]]:
    """The dump's tables: each one's columns and its rows in id order."""
    with contextlib.closing(sqlite3.connect(":memory:")) as connection:
        connection.executescript(V1_DUMP.read_text())
        names = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables: dict[str, tuple[list[str], list[tuple[object, ...]]]] = {}
        for (name,) in names.fetchall():
            cursor = connection.execute(f'SELECT * FROM "{name}" ORDER BY id')
            tables[name] = ([column[0] for column in cursor.description], cursor.fetchall())
        return tables


def _dump_into_postgresql(url: str) -> None:
    """Make the dump's version-1 database on PostgreSQL, as version 1 would have made it there.

    The dump is SQLite's SQL (DATETIME, 0/1 for booleans, no sequences), so it is not replayed:
    the models' tables are created as peewee creates them on PostgreSQL, cut down to the dump's
    columns, then the dump's rows are inserted (peewee's fields convert the SQLite values) and
    each id sequence is moved past them, as inserting through peewee would have left it.
    """
    tables = _dump_tables()
    models = [model for model in db.MODELS if model._meta.table_name in tables]
    target = db.connect(url)
    try:
        with target.bind_ctx(models), target.atomic():
            target.create_tables(models)
            for model in models:  # parents before children: MODELS is in that order
                table = model._meta.table_name
                columns, rows = tables[table]
                for column in set(model._meta.columns) - set(columns):
                    target.execute_sql(f'ALTER TABLE "{table}" DROP COLUMN "{column}"')
                if not rows:
                    continue
                fields = [model._meta.columns[column] for column in columns]
                model.insert_many(rows, fields=fields).execute()
                target.execute_sql(
                    f"SELECT setval(pg_get_serial_sequence(%s, 'id'), MAX(id)) FROM \"{table}\"",
                    (table,),
                )
    finally:
        db.close_database(target)


@pytest.fixture
def version_1_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database at schema version 1 holding the dump's rows: SQLite, or PostgreSQL when the
    engine tests run there."""
    if not engine_tests_use_postgresql():
        return f"sqlite:///{_database_from_dump(tmp_path)}"
    url: str = request.getfixturevalue("postgres_url")
    _dump_into_postgresql(url)
    return url


def test_every_version_has_a_migration() -> None:
    assert sorted(db.MIGRATIONS) == list(range(1, db.SCHEMA_VERSION))


def test_a_version_1_database_is_migrated_and_keeps_its_rows(version_1_url: str) -> None:
    dumped = _dump_tables()
    opened = db.open_database(version_1_url)
    try:
        # The migration ran (no fresh schema was created): version 1's row, then version 2's.
        versions = [info.version for info in db.SchemaInfo.select().order_by(db.SchemaInfo.id)]
        assert versions == [1, 2]
        assert db.schema_version(opened) == db.SCHEMA_VERSION == 2
        columns = {column.name for column in opened.get_columns("quarantine_entry")}
        assert "ruleset_version" in columns
        # Every row is kept, ids included (SchemaInfo's are checked above).
        for model in (m for m in db.MODELS if m is not db.SchemaInfo):
            kept = [row.id for row in model.select(model.id).order_by(model.id)]
            _columns, rows = dumped[model._meta.table_name]
            assert kept == [row[0] for row in rows], model.__name__
        instance = db.Instance.get(db.Instance.sop_instance_uid == "1.2.3.4.5")
        assert instance.series.study.patient.patient_id == "ANON0001"
        assert instance.archive_path == "ANON0001/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
        assert instance.size == 1234 and instance.ruleset_version is None
        node = db.RemoteNode.get()
        assert (node.ae_title, node.port) == ("PACS", 4242)
        assert node.tls is False and node.last_echo_ok is None
        assert db.AssociationLog.get().outcome == "released"
        # The new column takes values, and new rows get fresh ids after the kept ones.
        entry = db.QuarantineEntry.create(
            path="residual-phi/x.dcm", reason="residual-phi", ruleset_version=7
        )
        assert db.QuarantineEntry.get_by_id(entry.id).ruleset_version == 7
        assert db.Patient.create(patient_id="ANON0002").id == 2
        # Opening it again finds nothing to do.
        assert db.migrate(opened) == db.SCHEMA_VERSION
    finally:
        db.close_database(opened)


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
