"""The browser's engine side (engine/browse.py) on a real SQLite archive: no UI, no mocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import peewee as pw
import pytest

from tests.ui.archive import FilledArchive
from webaims_tui.config import Settings
from webaims_tui.engine import db
from webaims_tui.engine.browse import BrowseError, BrowseQuery
from webaims_tui.engine.service import Engine


@pytest.fixture
def opened(settings: Settings, filled: FilledArchive) -> Iterator[Engine]:
    engine = Engine(settings)
    engine.open()
    yield engine
    engine.stop()


def test_a_failed_delete_puts_every_file_back(opened: Engine, filled: FilledArchive) -> None:
    # A real database refusal: a trigger aborts the transaction half-way through.
    with db.database.connection_context():
        db.database.execute_sql(
            "CREATE TRIGGER refuse BEFORE DELETE ON series "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    patient = filled.patients["ANON0001"]
    with pytest.raises(pw.IntegrityError, match="refused by the test"):
        opened.delete_unit("patient", patient)
    assert filled.files["CT_small.dcm"].exists()
    assert filled.files["liver_1frame.dcm"].exists()
    with db.database.connection_context():
        assert db.Instance.select().count() == 5
    assert not list(opened.settings.paths.archive.glob(".trash-*"))


def test_delete_of_a_series_keeps_its_siblings_and_updates_the_record(
    opened: Engine, filled: FilledArchive
) -> None:
    result = opened.delete_unit("series", filled.series["ANON0001/CT HEAD/2"])
    assert (result.instances, result.files, result.missing_files) == (1, 1, 0)
    assert not filled.files["liver_1frame.dcm"].exists()
    assert filled.files["CT_small.dcm"].exists()
    with db.database.connection_context():
        assert db.Record.get().instance_count == 4


def test_an_existing_zip_is_never_overwritten(
    opened: Engine, filled: FilledArchive, tmp_path: Path
) -> None:
    target = tmp_path / "out.zip"
    target.write_bytes(b"precious")
    with pytest.raises(BrowseError, match="already exists"):
        opened.export_unit("study", filled.studies["ANON0002/MR KNEE"], target, as_zip=True)
    assert target.read_bytes() == b"precious"
    assert not list(tmp_path.glob("*.part"))


def test_an_archive_path_outside_the_archive_is_refused(
    opened: Engine, filled: FilledArchive
) -> None:
    instance = filled.instances["MR_small.dcm"]
    with db.database.connection_context():
        db.Instance.update(archive_path="../../etc/passwd").where(
            db.Instance.id == instance
        ).execute()
    with pytest.raises(BrowseError, match="outside the archive"):
        opened.tag_dump(instance)


def test_filters_counts_and_sorting(opened: Engine, filled: FilledArchive) -> None:
    page = opened.browse_page(BrowseQuery(patient="bravo"))
    assert [row.cells[0] for row in page.rows] == ["ANON0002"]
    page = opened.browse_page(BrowseQuery(level="study", description="plan"))
    assert page.total == 1 and page.rows[0].cells[4:6] == ("2", "2")  # series, instances
    page = opened.browse_page(BrowseQuery(level="study", sort="study_date", descending=True))
    assert [row.cells[0] for row in page.rows] == ["2024-01-15", "2023-11-02", "2022-06-30"]
    page = opened.browse_page(BrowseQuery(limit=2, offset=2))
    assert (page.total, page.first, page.last) == (3, 3, 3)
