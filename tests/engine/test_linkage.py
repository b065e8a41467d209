"""Keys and linkage: the site secret, consistency across processes, the linkage database."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import peewee as pw
import pytest
from pydicom import dcmread

from tests.conftest import SettingsFactory
from tests.engine.test_anonymize import make_dataset
from webaims_tui import locations
from webaims_tui.__main__ import main
from webaims_tui.engine import db
from webaims_tui.engine.linkage import (
    Keys,
    Linkage,
    load_or_create_site_secret,
    valid_uid_root,
)
from webaims_tui.engine.service import Engine

#: Run in a fresh interpreter: anonymize one file with the archive's active rule set and print
#: the values that must be stable.
CHILD = """
import json, sys
from pathlib import Path
from pydicom import dcmread
from webaims_tui.config import Overrides, load_settings
from webaims_tui.engine.service import Engine

config, data_dir, source = sys.argv[1:4]
settings = load_settings(Overrides(config_file=Path(config), data_dir=Path(data_dir)))
engine = Engine(settings)
anonymizer = engine.make_anonymizer()
out = anonymizer.anonymize(dcmread(source)).dataset
engine.stop()
print(json.dumps({k: str(out.get(k, "")) for k in (
    "PatientID", "PatientName", "StudyInstanceUID", "SOPInstanceUID", "StudyDate")}))
"""


def _run_child(config: Path, data_dir: Path, source: Path) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(config), str(data_dir), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_site_secret_is_created_once_with_owner_only_permissions(tmp_path: Path) -> None:
    path = tmp_path / "data" / "site-secret.key"
    secret = load_or_create_site_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_site_secret(path) == secret
    path.chmod(0o644)
    assert load_or_create_site_secret(path) == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened, not ignored


def test_keys_depend_on_the_secret() -> None:
    one, two = Keys(b"a" * 32), Keys(b"b" * 32)
    assert one.uid("1.2.3") == Keys(b"a" * 32).uid("1.2.3") != two.uid("1.2.3")
    assert one.pseudonym("PAT1") != two.pseudonym("PAT1")
    assert one.pseudonym("PAT1") != one.pseudonym("PAT2")
    shifts = {Keys(bytes([n]) * 32).date_shift_days("PAT1", 3650) for n in range(20)}
    assert len(shifts) > 10 and all(1 <= s <= 3650 for s in shifts)


def test_uid_root_validation() -> None:
    assert valid_uid_root("2.25.") is None
    assert valid_uid_root("1.2.826.0.1.3680043.10.543") is None
    assert valid_uid_root("1.2.03") is not None
    assert valid_uid_root("abc") is not None
    assert valid_uid_root("1." * 25) is not None


@pytest.mark.slow
def test_same_results_across_processes_and_different_with_another_secret(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings()
    source = tmp_path / "instance.dcm"
    make_dataset().save_as(source)
    first = _run_child(settings.config_file, settings.paths.data_dir, source)
    second = _run_child(settings.config_file, settings.paths.data_dir, source)
    assert first == second
    assert first["PatientID"] != "PAT12345" and first["StudyDate"] not in ("", "20240115")
    # Another site (another data dir, so another secret) gets different pseudonyms and UIDs.
    other = _run_child(settings.config_file, tmp_path / "other-site", source)
    for key in ("PatientID", "StudyInstanceUID", "SOPInstanceUID"):
        assert other[key] != first[key]
    # ...unless it is given this site's secret.
    secret_file = locations.site_secret_file(settings.paths.data_dir)
    copied = tmp_path / "copied-site"
    copied.mkdir()
    target = locations.site_secret_file(copied)
    target.write_bytes(secret_file.read_bytes())
    os.chmod(target, 0o600)
    assert _run_child(settings.config_file, copied, source) == first


def test_linkage_lives_apart_from_the_archive_and_reidentifies(
    make_settings: SettingsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    engine = Engine(settings)
    try:
        out = engine.make_anonymizer().anonymize(make_dataset()).dataset
        entries = engine.reidentify(out.PatientID)
    finally:
        engine.stop()
    assert [(e.kind, e.original) for e in entries] == [("PatientID", "PAT12345")]
    assert settings.paths.linkage_database_url != settings.paths.database_url
    # Asked through each database itself, so the check means the same on SQLite and PostgreSQL.
    linkage = db.connect(settings.paths.linkage_database_url)
    try:
        pairs = linkage.execute_sql("SELECT kind, original, pseudonym FROM linkage").fetchall()
        assert ("PatientID", "PAT12345", out.PatientID) in [tuple(row) for row in pairs]
        assert db.Instance._meta.table_name not in linkage.get_tables()
    finally:
        db.close_database(linkage)
    archive = db.connect(settings.paths.database_url)
    try:
        tables = archive.get_tables()
        assert db.Instance._meta.table_name in tables and "linkage" not in tables
        # No text column of any archive table holds the original ID.
        with archive.bind_ctx(db.MODELS):
            _assert_nowhere_in_the_archive("PAT12345")
    finally:
        db.close_database(archive)
    if settings.paths.database_url.startswith("sqlite:///"):
        # SQLite also keeps old page versions in its WAL and free pages, where no query looks.
        path = Path(settings.paths.database_url.removeprefix("sqlite:///"))
        for part in path.parent.glob(path.name + "*"):
            assert b"PAT12345" not in part.read_bytes(), part.name

    common = ["--config", str(settings.config_file), "--data-dir", str(settings.paths.data_dir)]
    assert main(["reidentify", out.PatientID, *common]) == 0
    assert "PatientID: PAT12345" in capsys.readouterr().out
    assert main(["reidentify", "SUBJNOSUCHONE", *common]) == 1


def _assert_nowhere_in_the_archive(value: str) -> None:
    for model in db.MODELS:
        for field in model._meta.sorted_fields:
            if isinstance(field, pw.CharField | pw.TextField):
                found = model.select().where(field.contains(value)).count()
                assert found == 0, f"{value} in {model._meta.table_name}.{field.name}"


def test_linkage_records_each_pair_once_and_from_other_threads(tmp_path: Path) -> None:
    import threading

    url = f"sqlite:///{tmp_path / 'linkage.sqlite3'}"
    linkage = Linkage(url)
    linkage.record("PatientID", "A", "PA")
    linkage.record("PatientID", "A", "PA")
    worker = threading.Thread(target=linkage.record, args=("PatientID", "B", "PB"))
    worker.start()
    worker.join()
    assert linkage.count() == 2
    linkage.close()
    reopened = Linkage(url)  # a second process (the CLI) sees what the autoloader wrote
    assert [e.original for e in reopened.lookup("PB")] == ["B"]
    reopened.close()


def test_dry_run_does_not_write_the_linkage(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    source = tmp_path / "instance.dcm"
    make_dataset().save_as(source)
    engine = Engine(settings)
    try:
        report = engine.dry_run(source)
        pseudonym = next(c.after for c in report.changes if c.path == "PatientID")
        assert pseudonym and engine.reidentify(pseudonym) == []
    finally:
        engine.stop()
    assert dcmread(source).PatientID == "PAT12345"


def test_uid_root_comes_from_settings_and_a_bad_one_is_a_config_error(
    make_settings: SettingsFactory,
) -> None:
    from webaims_tui.config import ConfigError

    root = "1.2.826.0.1.3680043.10.777"
    engine = Engine(make_settings(f'[anonymization]\nuid_root = "{root}"\n'))
    try:
        out = engine.make_anonymizer().anonymize(make_dataset()).dataset
    finally:
        engine.stop()
    assert out.SOPInstanceUID.startswith(root + ".") and len(out.SOPInstanceUID) <= 64
    engine = Engine(make_settings('[anonymization]\nuid_root = "1.2.03"\n'))
    try:
        with pytest.raises(ConfigError, match=r"anonymization\.uid_root"):
            engine.make_anonymizer()
    finally:
        engine.stop()
