"""Re-anonymizing a unit from its kept originals with a changed rule set."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import SettingsFactory
from webaims_tui.engine import db
from webaims_tui.engine.reanonymize import ReanonymizeRefused
from webaims_tui.engine.service import Engine

RULES_WITH_A_TAG = """
name = "tagged"

[profile]
name = "basic"

[[rules]]
match = "StudyDescription"
action = "set"
value = "REANONYMIZED"
"""


def _archive_ct(make_settings: SettingsFactory, keep_originals: bool) -> Engine:
    config = f"[autoloader]\nkeep_originals = {'true' if keep_originals else 'false'}\n"
    engine = Engine(make_settings(config))
    engine.open()
    engine.import_paths([Path(str(get_testdata_file("CT_small.dcm")))])
    counts = engine.process_incoming()
    assert counts is not None
    with db.database.connection_context():
        assert db.Instance.select().count() == 1
    return engine


def _archived(engine: Engine) -> tuple[db.Study, Path]:
    with db.database.connection_context():
        instance = db.Instance.get()
        return instance.series.study, engine.settings.paths.archive / instance.archive_path


def test_a_study_is_anonymized_again_with_the_active_rules(make_settings: SettingsFactory) -> None:
    engine = _archive_ct(make_settings, keep_originals=True)
    try:
        study, first_file = _archived(engine)
        assert "StudyDescription" not in dcmread(first_file)  # the basic profile removes it
        engine.save_rule_set(RULES_WITH_A_TAG)
        engine.activate_rule_set("tagged")
        engine.apply_active_rule_set()

        result = engine.reanonymize_unit("study", study.id)
        assert result.instances == 1
        assert engine.process_incoming() is not None

        _, second_file = _archived(engine)
        archived = dcmread(second_file)
        assert archived.StudyDescription == "REANONYMIZED"
        original = dcmread(get_testdata_file("CT_small.dcm"))
        assert archived.PixelData == original.PixelData
        assert archived.PatientName != original.PatientName
        with db.database.connection_context():
            assert db.Instance.select().count() == 1
            (stored,) = db.RuleSet.select().where(db.RuleSet.name == "tagged")
            assert db.Instance.get().ruleset_version == stored.id
        # The original is kept again, ready for the next change of rules.
        assert len(list(engine.settings.paths.originals.rglob("*.dcm"))) == 1
    finally:
        engine.stop()


def test_without_kept_originals_it_refuses_and_changes_nothing(
    make_settings: SettingsFactory,
) -> None:
    engine = _archive_ct(make_settings, keep_originals=False)
    try:
        study, archived = _archived(engine)
        before = archived.read_bytes()
        with pytest.raises(ReanonymizeRefused, match="originals are not kept"):
            engine.reanonymize_unit("study", study.id)
        assert archived.read_bytes() == before
        with db.database.connection_context():
            assert db.Instance.select().count() == 1
        assert not list(engine.settings.paths.incoming.iterdir())
    finally:
        engine.stop()
