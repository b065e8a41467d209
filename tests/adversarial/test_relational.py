"""One SOP Instance UID under two studies or series: a relational conflict, never a duplicate.

A sender that re-uses a SOP Instance UID in another study or series (a copy edited by hand, a
broken modality, an attack on the index) must not move or replace the archived instance, whatever
``duplicate_policy`` says: the newcomer goes to ``quarantine/relational-conflict/`` and the index
and the archived file stay as they were. The files go through the default rule set, as in
production: the anonymized UIDs are what the autoloader compares.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import SettingsFactory
from tests.engine.test_autoloader import UID_ROOT, archive_files, make_instance
from tests.helpers import EventRecorder
from webaims_tui.engine import db
from webaims_tui.engine.events import InstanceArchived, InstanceQuarantined
from webaims_tui.engine.service import Engine

POLICIES = ["keep-first", "overwrite", "reject"]

#: Which UIDs the second file changes, and what the quarantine detail must then say.
CHANGES = {
    "series": ("the Series Instance UID differs", "another series"),
    "study": ("the Study Instance UID differs", "another study"),
    "study and series": ("the Study and Series Instance UIDs differ", "another study"),
}


@pytest.fixture(params=POLICIES)
def policy_engine(
    request: pytest.FixtureRequest, make_settings: SettingsFactory, events: EventRecorder
) -> Iterator[Engine]:
    """An opened engine with the default rule set and the policy the test is run with."""
    config = f'[autoloader]\nduplicate_policy = "{request.param}"\n'
    opened = Engine(make_settings(config), sink=events)
    opened.open()
    yield opened
    opened.stop()


def _uids(change: str) -> tuple[dict[str, str], dict[str, str]]:
    """(first, second) keyword arguments of ``make_instance``: one SOP Instance UID."""
    sop, study, series = (generate_uid(UID_ROOT) for _ in range(3))
    first = {"sop_uid": sop, "study_uid": study, "series_uid": series}
    second = dict(first)
    if "study" in change:
        second["study_uid"] = generate_uid(UID_ROOT)
    if "series" in change:
        second["series_uid"] = generate_uid(UID_ROOT)
    return first, second


def _indexed() -> list[tuple[str, str, str, str]]:
    """(SOP, series, study, archive path) of every indexed instance, anonymized values."""
    with db.database.connection_context():
        query = (
            db.Instance.select(
                db.Instance.sop_instance_uid,
                db.Series.series_instance_uid,
                db.Study.study_instance_uid,
                db.Instance.archive_path,
            )
            .join(db.Series)
            .join(db.Study)
            .tuples()
        )
        return list(query)


def _check_quarantined(
    engine: Engine, events: EventRecorder, sent: Path, sent_bytes: bytes, change: str
) -> None:
    """``sent`` sits in quarantine/relational-conflict/, unchanged, with a sidecar saying why."""
    expected_detail, level = CHANGES[change]
    stored = engine.settings.paths.quarantine / "relational-conflict" / sent.name
    assert stored.read_bytes() == sent_bytes
    sidecar = json.loads(Path(f"{stored}.json").read_text())
    assert sidecar["reason"] == "relational-conflict"
    assert expected_detail in sidecar["detail"] and level in sidecar["detail"]
    # Names what differs, never a value: no UID, no patient data.
    original = dcmread(stored)
    for value in ("PAT1", "Test", original.StudyInstanceUID, original.SeriesInstanceUID):
        assert str(value) not in sidecar["detail"]
    for _sop, series, study, _path in _indexed():
        assert series not in sidecar["detail"] and study not in sidecar["detail"]
    with db.database.connection_context():
        entries = [(e.reason, Path(e.path).name) for e in db.QuarantineEntry.select()]
    assert entries == [("relational-conflict", sent.name)]
    quarantined = events.of(InstanceQuarantined)
    assert [(q.reason, q.detail) for q in quarantined] == [
        ("relational-conflict", sidecar["detail"])
    ]
    assert not list(engine.settings.paths.incoming.iterdir())


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_known_instance_in_another_study_or_series_is_quarantined(
    policy_engine: Engine, events: EventRecorder, change: str
) -> None:
    incoming = policy_engine.settings.paths.incoming
    archive = policy_engine.settings.paths.archive
    first, second = _uids(change)
    make_instance(incoming, fill=1, **first)
    policy_engine.process_incoming()
    before = _indexed()
    assert len(before) == 1
    archived = archive / before[0][3]
    archived_bytes = archived.read_bytes()

    # The same image again, under another study or series: identical pixels, so only the
    # UIDs make it differ.
    sent = make_instance(incoming, fill=1, **second)
    sent_bytes = sent.read_bytes()
    policy_engine.process_incoming()

    _check_quarantined(policy_engine, events, sent, sent_bytes, change)
    assert _indexed() == before
    assert archive_files(archive) == [before[0][3]]
    assert archived.read_bytes() == archived_bytes
    assert len(events.of(InstanceArchived)) == 1


@pytest.mark.parametrize("change", list(CHANGES))
def test_two_files_of_one_batch_in_two_studies_or_series_keep_the_first(
    policy_engine: Engine, events: EventRecorder, change: str
) -> None:
    incoming = policy_engine.settings.paths.incoming
    archive = policy_engine.settings.paths.archive
    first, second = _uids(change)
    # Both wait in incoming/ at once: one pass, one batch (names sort in creation order).
    kept = make_instance(incoming, fill=1, **first)
    sent = make_instance(incoming, fill=2, **second)
    sent_bytes = sent.read_bytes()
    kept_pixels = dcmread(kept).PixelData
    policy_engine.process_incoming()

    _check_quarantined(policy_engine, events, sent, sent_bytes, change)
    rows = _indexed()
    assert len(rows) == 1
    assert archive_files(archive) == [rows[0][3]]
    stored = dcmread(archive / rows[0][3])
    assert stored.PixelData == kept_pixels
    assert (stored.SeriesInstanceUID, stored.StudyInstanceUID) == (rows[0][1], rows[0][2])


def test_an_instance_whose_file_is_gone_is_not_restored_from_another_series(
    policy_engine: Engine, events: EventRecorder
) -> None:
    """A missing archived file is normally restored by the next copy; not by one that claims
    another series, which would move the instance in the index."""
    incoming = policy_engine.settings.paths.incoming
    first, second = _uids("series")
    make_instance(incoming, fill=1, **first)
    policy_engine.process_incoming()
    before = _indexed()
    (policy_engine.settings.paths.archive / before[0][3]).unlink()

    sent = make_instance(incoming, fill=1, **second)
    sent_bytes = sent.read_bytes()
    policy_engine.process_incoming()

    _check_quarantined(policy_engine, events, sent, sent_bytes, "series")
    assert _indexed() == before
    assert archive_files(policy_engine.settings.paths.archive) == []
