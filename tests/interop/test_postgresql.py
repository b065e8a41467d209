"""``webaims-tui db migrate`` and ``db copy`` against a real PostgreSQL server (tests/postgres.py).

The copy source is a filled SQLite archive: patients, studies, series and instances (enough rows
for several batches, with gaps in the keys), association and receive logs, quarantine entries,
rule sets and remote nodes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import random
import subprocess
import sys
from datetime import datetime, timedelta
from multiprocessing.queues import Queue
from pathlib import Path

import peewee as pw
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.postgres import PostgresServer
from webaims_tui.__main__ import main
from webaims_tui.engine import db
from webaims_tui.engine.database_copy import copy_order

pytestmark = pytest.mark.interop

INSTANCES_PER_SERIES = 40


def fill_archive(url: str) -> dict[str, int]:
    """An SQLite archive with rows in every table; returns the row count per table."""
    header = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    database = db.open_database(url)
    clock = datetime(2026, 1, 2, 3, 4, 5, 678000)
    try:
        with database.atomic():
            for n in range(12):
                record = db.Record.create(unit="study", key=f"R{n}", instance_count=3)
                patient, _ = db.get_or_create_unique(
                    db.Patient,
                    db.Patient.patient_id,
                    f"ANON{n % 5}",
                    {"patient_name": f"Anon^{n % 5}", "sex": "O", "created_at": clock},
                )
                study = db.Study.create(
                    study_instance_uid=f"{header.StudyInstanceUID}.{n}",
                    patient=patient,
                    record=record,
                    study_date=str(header.StudyDate),
                    description="Ünïcode ß description",
                    created_at=clock + timedelta(seconds=n),
                )
                for s in range(2):
                    series = db.Series.create(
                        series_instance_uid=f"1.2.8.{n}.{s}",
                        study=study,
                        record=record if s else None,
                        modality=str(header.Modality),
                        series_number=s or None,
                    )
                    db.Instance.insert_many(
                        [
                            {
                                "sop_instance_uid": f"1.2.7.{n}.{s}.{i}",
                                "series": series.id,
                                "record": record.id,
                                "sop_class_uid": str(header.SOPClassUID),
                                "instance_number": i,
                                "size": 2**33 + i,  # BigInteger beyond 32 bits
                                "received_at": clock + timedelta(milliseconds=i),
                                "archive_path": f"ANON{n % 5}/{n}/{s}/{i}.dcm",
                                "ruleset_version": None if i % 2 else 3,
                            }
                            for i in range(INSTANCES_PER_SERIES)
                        ]
                    ).execute()
            association = db.AssociationLog.create(
                calling_ae="STORESCU", called_ae="WEBAIMS", peer_address="127.0.0.1"
            )
            db.ReceivedInstanceLog.insert_many(
                [
                    {
                        "association": association.id,
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "sop_instance_uid": f"1.2.6.{i}",
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "status": 0,
                    }
                    for i in range(30)
                ]
            ).execute()
            db.QuarantineEntry.create(path="quarantine/a.dcm", reason="burned-in", detail="x")
            db.RuleSet.create(name="default", version=1, toml="[rules]\n", active=True)
            db.RemoteNode.create(
                name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242, last_echo_ok=True
            )
            # Gaps in the primary keys must survive the copy (and the sequences).
            db.Instance.delete().where(db.Instance.instance_number == 7).execute()
        return {m._meta.table_name: m.select().count() for m in copy_order()}
    finally:
        db.close_database(database)


@pytest.fixture
def sqlite_archive(tmp_path: Path) -> tuple[str, dict[str, int]]:
    url = f"sqlite:///{tmp_path / 'archive.sqlite3'}"
    return url, fill_archive(url)


def table_rows(url: str) -> dict[str, list[dict[str, object]]]:
    """Every row of every table, keyed by table, ordered by id, values as Python types."""
    database = db.connect(url)
    try:
        return {
            m._meta.table_name: list(m.select().order_by(m.id).dicts().execute(database))
            for m in copy_order()
        }
    finally:
        db.close_database(database)


def test_db_copy_moves_a_filled_sqlite_archive_into_postgresql(
    sqlite_archive: tuple[str, dict[str, int]],
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source_url, counts = sqlite_archive
    assert counts["instance"] > 900  # several batches of 250
    code = main(
        ["db", "copy", "--database-url", source_url, "--to", postgres_url, "--batch-size", "250"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for table, rows in counts.items():
        assert f"{rows:>10} -> {rows:>10}  ok" in out.split(table, 1)[1].splitlines()[0]

    source, target = table_rows(source_url), table_rows(postgres_url)
    assert {t: len(r) for t, r in target.items()} == counts
    # Spot checks: random rows of every table are identical, keys, references and all.
    chooser = random.Random(8)
    for table, rows in source.items():
        for row in chooser.sample(rows, min(25, len(rows))):
            index = next(i for i, r in enumerate(target[table]) if r["id"] == row["id"])
            assert target[table][index] == row, table

    # The sequences moved past the copied keys: a node inserting next gets a fresh id.
    database = db.open_database(postgres_url)
    try:
        series = db.Series.select().first()
        new = db.Instance.create(
            sop_instance_uid="9.9.9", series=series, sop_class_uid="1.2", archive_path="x"
        )
        assert new.id == max(r["id"] for r in source["instance"]) + 1
        assert db.schema_version(database) == db.SCHEMA_VERSION
    finally:
        db.close_database(database)


def test_db_copy_refuses_a_target_with_data_unless_forced(
    sqlite_archive: tuple[str, dict[str, int]],
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source_url, counts = sqlite_archive
    assert main(["db", "copy", "--database-url", source_url, "--to", postgres_url]) == 0
    capsys.readouterr()

    assert main(["db", "copy", "--database-url", source_url, "--to", postgres_url]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert {t: len(r) for t, r in table_rows(postgres_url).items()} == counts

    # --force replaces the contents: the counts are those of the source, not doubled.
    assert main(["db", "copy", "--database-url", source_url, "--to", postgres_url, "--force"]) == 0
    assert {t: len(r) for t, r in table_rows(postgres_url).items()} == counts


def test_db_copy_from_postgresql_back_into_sqlite_round_trips(
    sqlite_archive: tuple[str, dict[str, int]], postgres_url: str, tmp_path: Path
) -> None:
    source_url, _ = sqlite_archive
    back_url = f"sqlite:///{tmp_path / 'back.sqlite3'}"
    assert main(["db", "copy", "--database-url", source_url, "--to", postgres_url]) == 0
    assert main(["db", "copy", "--database-url", postgres_url, "--to", back_url]) == 0
    assert table_rows(back_url) == table_rows(source_url)


def test_db_copy_names_an_unreachable_target_without_its_password(
    sqlite_archive: tuple[str, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    source_url, _ = sqlite_archive
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    target = "postgresql://webaims:s3cret@127.0.0.1:1/webaims"
    assert main(["db", "copy", "--database-url", source_url, "--to", target]) == 1
    err = capsys.readouterr().err
    assert "cannot open postgresql://webaims:***@127.0.0.1:1/webaims" in err
    assert "s3cret" not in err


def test_db_migrate_creates_then_reports_the_current_version(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "migrate", "--database-url", postgres_url]) == 0
    assert f"created at schema version {db.SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["db", "migrate", "--database-url", postgres_url]) == 0
    assert f"already at schema version {db.SCHEMA_VERSION}" in capsys.readouterr().out


def test_db_migrate_runs_a_column_migration_on_postgresql(
    postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at the current version is taken one version further by a real migration."""
    from playhouse.migrate import SchemaMigrator, migrate

    assert main(["db", "migrate", "--database-url", postgres_url]) == 0
    capsys.readouterr()

    def add_column(migrator: SchemaMigrator) -> None:
        migrate(migrator.add_column("remote_node", "probe", pw.TextField(default="")))

    monkeypatch.setattr(db, "SCHEMA_VERSION", db.SCHEMA_VERSION + 1)
    monkeypatch.setitem(db.MIGRATIONS, db.SCHEMA_VERSION - 1, add_column)
    assert main(["db", "migrate", "--database-url", postgres_url]) == 0
    out = capsys.readouterr().out
    assert f"from schema version {db.SCHEMA_VERSION - 1} to {db.SCHEMA_VERSION}" in out
    database = db.connect(postgres_url)
    try:
        assert "probe" in {c.name for c in database.get_columns("remote_node")}
    finally:
        db.close_database(database)


def test_nodes_migrating_an_empty_database_at_once_both_succeed(postgres_url: str) -> None:
    """Two nodes started together: the advisory lock lets one create, the other find."""
    command = [sys.executable, "-m", "webaims_tui", "db", "migrate", "--database-url"]
    runs = [
        subprocess.Popen([*command, postgres_url], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0]
    assert sum("created at" in out for out in outputs) == 1
    assert sum("already at" in out for out in outputs) == 2


def test_db_copy_of_a_value_postgresql_refuses_keeps_nothing_and_says_which_table(
    sqlite_archive: tuple[str, dict[str, int]],
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SQLite stores a 300-character description in VARCHAR(256); PostgreSQL refuses it."""
    source_url, _ = sqlite_archive
    source = db.connect(source_url)
    try:
        source.execute_sql("UPDATE study SET description = ? WHERE id = 3", ("x" * 300,))
    finally:
        db.close_database(source)
    assert main(["db", "copy", "--database-url", source_url, "--to", postgres_url]) == 1
    err = capsys.readouterr().err
    assert "study:" in err and "nothing was kept" in err
    # One transaction: the tables copied before the failing one were rolled back too.
    left = {table: len(rows) for table, rows in table_rows(postgres_url).items()}
    assert left.pop("schema_info") == 1  # the schema, created before the copy's transaction
    assert set(left.values()) == {0}


def _open_linkage(url: str, start: multiprocessing.synchronize.Event, results: Queue) -> None:
    from webaims_tui.engine.linkage import Linkage

    start.wait(30)
    try:
        linkage = Linkage(url)
        linkage.record("PatientID", "original", "pseudonym")
        linkage.close()
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


@pytest.mark.slow
def test_nodes_opening_a_new_linkage_database_at_once_all_succeed(
    postgres_server: PostgresServer,
) -> None:
    """CREATE TABLE IF NOT EXISTS from several sessions at once fails in PostgreSQL (pg_type
    unique violation) unless serialised: measured 6 of 15 rounds of 4 processes before."""
    context = multiprocessing.get_context("fork")
    for _ in range(8):
        url = postgres_server.create_database("linkage")
        start = context.Event()
        results: Queue = context.Queue()
        workers = [
            context.Process(target=_open_linkage, args=(url, start, results)) for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        start.set()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(30)
        assert outcomes == ["ok"] * 4
        database = db.connect(url)
        try:
            assert database.execute_sql("SELECT count(*) FROM linkage").fetchone()[0] == 1
        finally:
            db.close_database(database)


def test_db_copy_linkage_moves_the_pseudonym_pairs_into_postgresql(
    tmp_path: Path, postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from webaims_tui.engine.linkage import Linkage

    source_url = f"sqlite:///{tmp_path / 'linkage.sqlite3'}"
    source = Linkage(source_url)
    pairs = [("PatientID", f"ORIGINAL-{n}", f"PSEUDO-{n}") for n in range(2500)]
    for kind, original, pseudonym in pairs:
        source.record(kind, original, pseudonym)
    source.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nlinkage_database_url = "{source_url}"\n')
    target_url = postgres_server.create_database("linkage")
    command = ["db", "copy", "--linkage", "--config", str(config), "--to", target_url]

    assert main(command) == 0
    assert "2500 ->       2500  ok" in capsys.readouterr().out
    target = Linkage(target_url)
    try:
        assert target.count() == 2500
        found = target.lookup("PSEUDO-1234")
        assert [(e.kind, e.original) for e in found] == [("PatientID", "ORIGINAL-1234")]
    finally:
        target.close()
    # A second copy is refused; --force merges without duplicating a pair.
    assert main(command) == 1
    assert "--force" in capsys.readouterr().err
    assert main([*command, "--force"]) == 0
    target = Linkage(target_url)
    try:
        assert target.count() == 2500
    finally:
        target.close()
