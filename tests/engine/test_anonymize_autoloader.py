"""The rule engine behind the real autoloader: what reaches archive/ and what goes to quarantine.

The engine's anonymizer is the active stored rule set (``Engine.make_anonymizer()``); files are
imported into incoming/ and processed by the autoloader exactly as received files are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread

from tests.conftest import SettingsFactory
from webaims_tui.engine import db
from webaims_tui.engine.profile import default_rule_set
from webaims_tui.engine.quarantine import reconcile_quarantine
from webaims_tui.engine.rules import Rule
from webaims_tui.engine.service import Engine

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
IMAGES = ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm")
ULTRASOUND = "examples_ybr_color.dcm"  # Modality US: may carry burned-in text


def test_autoloader_archives_anonymized_copies_and_quarantines_burned_in(
    make_settings: SettingsFactory,
) -> None:
    engine = Engine(make_settings())
    engine.open()
    try:
        engine.anonymizer = engine.make_anonymizer()
        active = next(s for s in engine.rule_sets() if s.active)
        sources = [TEST_FILES / name for name in (*IMAGES, ULTRASOUND)]
        engine.import_paths(sources)
        counters = engine.process_incoming()
        assert counters is not None
        assert (counters.archived, counters.quarantined) == (len(IMAGES), 1)

        quarantined = engine.quarantine_entries()
        assert [q.reason for q in quarantined] == ["burned-in-annotation"]
        assert "modality US" in quarantined[0].detail

        archive = engine.settings.paths.archive
        with db.database.connection_context():
            rows = list(db.Instance.select())
        assert {row.ruleset_version for row in rows} == {active.id}
        originals = {dcmread(p).SOPInstanceUID: dcmread(p) for p in sources[: len(IMAGES)]}
        keys = engine.make_anonymizer().keys
        for row in rows:
            archived = dcmread(archive / row.archive_path)
            assert archived.PatientIdentityRemoved == "YES"
            assert archived.PatientID.startswith("SUBJ")
            assert not any(e.tag.is_private for e in archived.iterall())
            original = next(
                ds for uid, ds in originals.items() if keys.uid(uid) == archived.SOPInstanceUID
            )
            assert archived.PixelData == original.PixelData
            assert archived.PatientID != original.PatientID
            assert row.sop_instance_uid == archived.SOPInstanceUID
        # The archive's own index holds only the pseudonyms.
        with db.database.connection_context():
            ids = {p.patient_id for p in db.Patient.select()}
        assert ids and all(i.startswith("SUBJ") for i in ids)
        entries = engine.reidentify(next(iter(ids)))
        assert entries and entries[0].kind == "PatientID"
    finally:
        engine.stop()


def test_a_rule_set_that_leaks_the_name_quarantines_the_file_and_is_counted(
    make_settings: SettingsFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="webaims_tui")
    # Free text that names the patient, in an element the leaking rule set keeps.
    original = dcmread(TEST_FILES / "CT_small.dcm")
    surname = str(original.PatientName).split("^")[0]
    original.StudyDescription = f"Follow-up of {surname}"
    source = tmp_path / "follow-up.dcm"
    original.save_as(source)
    leaking = dataclasses.replace(
        default_rule_set(),
        name="leaking",
        rules=(*default_rule_set().rules, Rule(match="StudyDescription", action="keep")),
    )
    engine = Engine(make_settings())
    engine.open()
    try:
        stored = engine.save_rule_set(leaking)
        engine.activate_rule_set(stored.name, stored.version)
        engine.anonymizer = engine.make_anonymizer()
        engine.import_paths([source])
        counters = engine.process_incoming()
        assert counters is not None
        assert (counters.archived, counters.quarantined) == (0, 1)

        [entry] = engine.quarantine_entries()
        assert entry.reason == "residual-phi"
        quarantine = engine.settings.paths.quarantine
        quarantined = quarantine / entry.path
        assert quarantined.parent == quarantine / "residual-phi"
        assert dcmread(quarantined).StudyDescription == original.StudyDescription  # as received
        sidecar = json.loads(Path(f"{quarantined}.json").read_text())
        assert (sidecar["reason"], sidecar["detail"]) == (entry.reason, entry.detail)
        assert sidecar["ruleset_version"] == stored.id
        # The detail names the element and whose value it holds, never the value.
        assert "StudyDescription" in entry.detail and "PatientName" in entry.detail
        for text in (json.dumps(sidecar), caplog.text):
            assert surname.casefold() not in text.casefold()
            assert original.PatientID not in text

        # Nothing was indexed or archived.
        with db.database.connection_context():
            assert db.Instance.select().count() == db.Patient.select().count() == 0
            assert db.QuarantineEntry.get_by_id(entry.id).ruleset_version == stored.id
        archive = engine.settings.paths.archive
        assert not [p for p in archive.rglob("*") if p.is_file()]

        assert engine.residual_phi_leaks() == {stored.id: 1}
        # Killed between moving the file and inserting its row: the row the repair makes reads
        # the version back from the sidecar, so the leak still counts.
        with db.database.connection_context():
            db.QuarantineEntry.delete().execute()
            assert reconcile_quarantine(quarantine) == 1
        assert engine.residual_phi_leaks() == {stored.id: 1}
    finally:
        engine.stop()
