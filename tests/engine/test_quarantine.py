"""``webaims-tui quarantine list`` and ``retry`` through the real CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import SettingsFactory
from tests.engine.test_autoloader import UID_ROOT, make_instance
from tests.helpers import EventRecorder
from webaims_tui.__main__ import main
from webaims_tui.engine import db
from webaims_tui.engine.service import Engine


def _cli(tmp_path: Path, *args: str) -> list[str]:
    config = str(tmp_path / "config.toml")
    return ["--config", config, "--data-dir", str(tmp_path / "data"), *args]


def _listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(_cli(tmp_path, "quarantine", "list", "--json")) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_list_and_retry_after_a_policy_change(
    make_settings: SettingsFactory,
    events: EventRecorder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings()
    engine = Engine(settings, sink=events)
    engine.open()
    incoming = settings.paths.incoming
    common = {
        "sop_uid": generate_uid(UID_ROOT),
        "study_uid": generate_uid(UID_ROOT),
        "series_uid": generate_uid(UID_ROOT),
    }
    try:
        make_instance(incoming, fill=1, **common)
        engine.process_incoming()
        make_instance(incoming, fill=2, calling_ae="MODALITY1", **common)
        junk = incoming / "junk.bin"
        junk.write_bytes(b"junk" * 100)

        old = time.time() - 60
        os.utime(junk, (old, old))
        engine.process_incoming()
    finally:
        engine.stop()

    entries = _listed(tmp_path, capsys)
    assert sorted(e["reason"] for e in entries) == ["duplicate-conflict", "not-dicom"]
    conflict = next(e for e in entries if e["reason"] == "duplicate-conflict")
    assert conflict["source"] == "MODALITY1" and conflict["sop_instance_uid"]
    assert main(_cli(tmp_path, "quarantine", "list")) == 0
    assert "duplicate-conflict" in capsys.readouterr().out

    assert main(_cli(tmp_path, "quarantine", "retry", "999")) == 2
    assert "no quarantine entry 999" in capsys.readouterr().err

    # The newer copy is wanted after all: switch the policy and retry it.
    (tmp_path / "config.toml").write_text('[autoloader]\nduplicate_policy = "overwrite"\n')
    assert main(_cli(tmp_path, "quarantine", "retry", str(conflict["id"]))) == 0
    out = capsys.readouterr().out
    assert "moved back to incoming/: 1" in out and "quarantined again: 0" in out

    assert [e["reason"] for e in _listed(tmp_path, capsys)] == ["not-dicom"]
    engine = Engine(settings)
    engine.open()
    try:
        with db.database.connection_context():
            row = db.Instance.get()
        archived = settings.paths.archive / row.archive_path
        assert set(dcmread(archived).PixelData) == {2}  # the corrected copy
    finally:
        engine.stop()

    # Retrying what cannot be archived puts it back in quarantine, never loses it.
    assert main(_cli(tmp_path, "quarantine", "retry", "--all")) == 0
    assert "quarantined again: 1" in capsys.readouterr().out
    again = _listed(tmp_path, capsys)
    assert [e["reason"] for e in again] == ["not-dicom"]
    stored = settings.paths.quarantine / str(again[0]["path"])
    assert stored.read_bytes() == b"junk" * 100
    assert not list(settings.paths.incoming.iterdir())
