"""The database layer on whichever backend the suite runs on (SQLite, or PostgreSQL with
WEBAIMS_TEST_DATABASE=postgresql): schema creation, and the race-safe insert helpers that
several processes (several nodes) call for the same keys at the same moment.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator

import peewee as pw
import pytest

from tests.conftest import SettingsFactory
from tests.postgres import engine_tests_use_postgresql
from webaims_tui.engine import db


@pytest.fixture
def database_url(make_settings: SettingsFactory) -> str:
    return make_settings().paths.database_url


@pytest.fixture
def opened(database_url: str) -> Iterator[pw.Database]:
    database = db.open_database(database_url)
    yield database
    db.close_database(database)


def test_the_suite_runs_on_the_backend_it_was_asked_for(opened: pw.Database) -> None:
    assert db.is_postgresql(opened) == engine_tests_use_postgresql()
    assert isinstance(opened, pw.PostgresqlDatabase) == engine_tests_use_postgresql()


def test_a_new_database_is_created_at_the_current_schema_and_migrates_idempotently(
    opened: pw.Database,
) -> None:
    assert db.schema_version(opened) == db.SCHEMA_VERSION
    assert {m._meta.table_name for m in db.MODELS} <= set(opened.get_tables())
    assert db.migrate(opened) == db.SCHEMA_VERSION
    assert db.SchemaInfo.select().count() == 1


def test_get_or_create_unique_creates_once_and_then_finds(opened: pw.Database) -> None:
    first, created = db.get_or_create_unique(
        db.Patient, db.Patient.patient_id, "ANON-1", {"patient_name": "Anon^One"}
    )
    assert created
    again, created_again = db.get_or_create_unique(
        db.Patient, db.Patient.patient_id, "ANON-1", {"patient_name": "Other^Name"}
    )
    assert not created_again
    assert again.id == first.id
    # The defaults of a losing insert never overwrite the row that won.
    assert again.patient_name == "Anon^One"


def test_get_or_create_unique_inside_a_transaction_survives_the_duplicate(
    opened: pw.Database,
) -> None:
    """On PostgreSQL a failed INSERT aborts the transaction; ON CONFLICT DO NOTHING must not."""
    db.get_or_create_unique(db.Patient, db.Patient.patient_id, "ANON-2")
    with opened.atomic():
        row, created = db.get_or_create_unique(db.Patient, db.Patient.patient_id, "ANON-2")
        assert not created
        _, study_created = db.get_or_create_unique(
            db.Study, db.Study.study_instance_uid, "1.2.3.4", {"patient": row.id}
        )
        assert study_created
    assert db.Study.get(db.Study.study_instance_uid == "1.2.3.4").patient_id == row.id


def test_insert_missing_skips_taken_keys(opened: pw.Database) -> None:
    db.get_or_create_unique(db.Patient, db.Patient.patient_id, "P-1")
    rows = [{"patient_id": f"P-{n}"} for n in range(3)]
    assert db.insert_missing(db.Patient, rows, db.Patient.patient_id) == 2
    assert db.insert_missing(db.Patient, rows, db.Patient.patient_id) == 0
    assert db.Patient.select().count() == 3


def _race(database_url: str, keys: list[str], start: multiprocessing.synchronize.Event) -> list:
    database = db.open_database(database_url)
    try:
        start.wait(30)
        created = []
        for key in keys:
            patient, made = db.get_or_create_unique(db.Patient, db.Patient.patient_id, key)
            study, made_study = db.get_or_create_unique(
                db.Study, db.Study.study_instance_uid, f"1.2.{key[2:]}", {"patient": patient.id}
            )
            created.append((key, made, made_study, patient.id, study.id))
        return created
    finally:
        db.close_database(database)


def _race_worker(
    database_url: str,
    keys: list[str],
    start: multiprocessing.synchronize.Event,
    results: multiprocessing.Queue,
) -> None:
    try:
        results.put(_race(database_url, keys, start))
    except Exception as exc:
        # Reported, not raised: the test then fails at once instead of waiting on the queue.
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_processes_racing_for_the_same_keys_create_each_row_exactly_once(
    opened: pw.Database, database_url: str
) -> None:
    """Four processes (as four nodes would) insert the same 100 patients and studies at once."""
    keys = [f"P-{n}" for n in range(100)]
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results: multiprocessing.Queue = context.Queue()
    workers = [
        # Different orders make the processes collide on many keys, not just the first.
        context.Process(
            target=_race_worker, args=(database_url, keys[::step] + keys, start, results)
        )
        for step in (1, -1, 2, -2)
    ]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in workers]
    assert not [outcome for outcome in outcomes if isinstance(outcome, str)]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0

    assert db.Patient.select().count() == len(keys)
    assert db.Study.select().count() == len(keys)
    for key in keys:
        entries = [entry for outcome in outcomes for entry in outcome if entry[0] == key]
        # Every process saw the same row, and exactly one of all calls created it.
        assert len({entry[3] for entry in entries}) == 1
        assert len({entry[4] for entry in entries}) == 1
        assert sum(entry[1] for entry in entries) == 1
        assert sum(entry[2] for entry in entries) == 1


def test_threads_that_query_and_end_without_closing_do_not_exhaust_the_pool(
    database_url: str,
) -> None:
    """Worker threads (the TUI's, the CLI's) often query without connection_context(): their
    connections must come back when they end. On PostgreSQL the pool holds 16; 40 threads."""
    if database_url.startswith("postgresql://"):
        database_url += "?timeout=5"  # a broken pool fails in seconds, not after 30 s each
    database = db.open_database(database_url)
    counts: list[int] = []
    try:
        for _ in range(40):
            thread = threading.Thread(target=lambda: counts.append(db.Patient.select().count()))
            thread.start()
            thread.join(60)
        assert counts == [0] * 40
    finally:
        db.close_database(database)
