"""The rule engine behind the real autoloader: what reaches archive/ and what goes to quarantine.

The engine's anonymizer is the active stored rule set (``Engine.make_anonymizer()``); files are
imported into incoming/ and processed by the autoloader exactly as received files are.
"""

from __future__ import annotations

from pathlib import Path

import pydicom.data
from pydicom import dcmread

from tests.conftest import SettingsFactory
from webaims_tui.engine import db
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
