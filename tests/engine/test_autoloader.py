"""The autoloader: incoming/ -> anonymize -> index -> archive/, records, duplicates, reconciling.

Most tests put real DICOM files into incoming/ and call ``Engine.process_incoming()``, which runs
one full autoloader pass in the test's thread; the first test drives the running engine end to
end from a pynetdicom SCU.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from webaims_tui.config import ConfigError
from webaims_tui.engine import db
from webaims_tui.engine.anonymize import AnonymizationRefused, AnonymizationResult, PassThrough
from webaims_tui.engine.archive import MAX_COMPONENT_LENGTH, sanitize_component
from webaims_tui.engine.autoloader import ORPHAN_MIN_AGE_SECONDS, Autoloader, AutoloaderBusy
from webaims_tui.engine.events import (
    InstanceArchived,
    InstanceDuplicate,
    InstanceQuarantined,
    RecordCreated,
    RecordUpdated,
)
from webaims_tui.engine.quarantine import incoming_name
from webaims_tui.engine.service import Engine

UID_ROOT = "1.2.826.0.1.3680043.10.1234.77."


def make_instance(
    folder: Path,
    *,
    patient_id: str = "PAT1",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "CT",
    size: int = 8,
    description: str = "",
    calling_ae: str = "",
    name: str | None = None,
    fill: int | None = None,
) -> Path:
    """A small CT-like Part 10 file, written under an atomic incoming name unless ``name``."""
    sop_uid = sop_uid or generate_uid(UID_ROOT)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = series_uid or generate_uid(UID_ROOT)
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if fill is None:
        ds.PixelData = bytes(range(256)) * (size * size * 2 // 256) + bytes(size * size * 2 % 256)
    else:
        ds.PixelData = bytes([fill]) * (size * size * 2)
    path = folder / (name or incoming_name())
    ds.save_as(path, enforce_file_format=True)
    return path


def archive_files(archive: Path) -> list[str]:
    """Files in the archive, relative; the autoloader's dot folders do not count."""
    found = []
    for folder, dirs, files in os.walk(archive):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(folder, f), archive) for f in files]
    return sorted(found)


def opened_engine(
    settings_factory: SettingsFactory, events: EventRecorder, config: str = ""
) -> Engine:
    engine = Engine(settings_factory(config), sink=events)
    # These tests are about the archive's mechanics: values pass through unchanged so that
    # they can be checked (the rule engine has its own tests).
    engine.anonymizer = PassThrough()
    engine.open()
    return engine


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


# --- end to end ---------------------------------------------------------------------------


def test_corpus_from_an_scu_is_archived_and_indexed(
    make_settings: SettingsFactory, events: EventRecorder, corpus: list[Path]
) -> None:
    engine = Engine(make_settings(), sink=events)
    engine.anonymizer = PassThrough()  # so that every value can be compared with what was sent
    engine.start()
    try:
        _send_corpus_and_check(engine, events, corpus)
    finally:
        engine.stop()


def _send_corpus_and_check(engine: Engine, events: EventRecorder, corpus: list[Path]) -> None:
    lacking = {
        p
        for p in corpus
        if not dcmread(p).get("StudyInstanceUID") or not dcmread(p).get("SeriesInstanceUID")
    }
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for path in corpus:
        sent = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    assert engine.server is not None
    assoc = ae.associate("127.0.0.1", engine.server.port, ae_title="WEBAIMS")
    assert assoc.is_established
    for path in corpus:
        assert assoc.send_c_store(path).Status == 0x0000, path.name
    assoc.release()

    archived = events.wait_for(InstanceArchived, count=len(corpus) - len(lacking), timeout=120)
    quarantined = events.wait_for(InstanceQuarantined, count=len(lacking), timeout=60)
    assert {q.reason for q in quarantined} == {"missing-uid"}
    archive = engine.settings.paths.archive
    with db.database.connection_context():
        rows = {row.sop_instance_uid: row for row in db.Instance.select()}
        assert db.QuarantineEntry.select().count() == len(lacking)
    assert len(rows) == len(archived) == len(corpus) - len(lacking)
    assert archive_files(archive) == sorted(row.archive_path for row in rows.values())
    for path in set(corpus) - lacking:
        sent = dcmread(path)
        row = rows[str(sent.SOPInstanceUID)]
        assert row.calling_ae == "TESTSCU"
        assert row.archive_path == (
            f"{sanitize_component(str(sent.get('PatientID', '')))}/{sent.StudyInstanceUID}/"
            f"{sent.SeriesInstanceUID}/{sent.SOPInstanceUID}.dcm"
        )
        stored = dcmread(archive / row.archive_path)
        # Pass-through anonymization: every element arrives unchanged, pixel data included
        # (copied from the incoming file without being loaded).
        for element in sent:
            if element.tag.element == 0:
                continue
            assert stored[element.tag].value == element.value, f"{path.name} {element.tag}"
        assert "SourceApplicationEntityTitle" not in stored.file_meta
    assert not list(engine.settings.paths.incoming.iterdir())


# --- records ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("patient", {"P1": (6, 3, "CT\\MR"), "P2": (2, 1, "CT")}),
        ("study", {"S1": (5, 2, "CT\\MR"), "S2": (1, 1, "CT"), "S3": (2, 1, "CT")}),
        ("series", {"A": (3, 1, "CT"), "B": (2, 1, "MR"), "C": (1, 1, "CT"), "D": (2, 1, "CT")}),
    ],
)
def test_records_group_instances_by_the_record_unit(
    make_settings: SettingsFactory,
    events: EventRecorder,
    unit: str,
    expected: dict[str, tuple[int, int, str]],
) -> None:
    engine = opened_engine(make_settings, events, f'[autoloader]\nrecord_unit = "{unit}"\n')
    incoming = engine.settings.paths.incoming
    uid = {
        label: UID_ROOT + str(n)
        for n, label in enumerate(("S1", "S2", "S3", "A", "B", "C", "D"), 1)
    }
    layout = [  # (patient, study, series, modality, instances)
        ("P1", "S1", "A", "CT", 3),
        ("P1", "S1", "B", "MR", 2),
        ("P1", "S2", "C", "CT", 1),
        ("P2", "S3", "D", "CT", 2),
    ]
    files = [
        (label, patient, study, series, modality)
        for patient, study, series, modality, count in layout
        for label in [series] * count
    ]
    try:
        # Two passes: the second one updates records the first one created.
        for part in (files[::2], files[1::2]):
            for _label, patient, study, series, modality in part:
                make_instance(
                    incoming,
                    patient_id=patient,
                    study_uid=uid[study],
                    series_uid=uid[series],
                    modality=modality,
                )
            engine.process_incoming()
        with db.database.connection_context():
            records = {r.key: r for r in db.Record.select()}
            label_of = {u: label for label, u in uid.items()}
            by_label = {label_of.get(key, key): record for key, record in records.items()}
            assert {
                label: (r.instance_count, r.series_count, r.modalities)
                for label, r in by_label.items()
            } == expected
            assert all(r.unit == unit for r in records.values())
            for record in records.values():
                assert db.Instance.select().where(db.Instance.record == record).count() == (
                    record.instance_count
                )
            assert db.Instance.select().where(db.Instance.record.is_null()).count() == 0
        created = events.of(RecordCreated)
        assert sorted(e.key for e in created) == sorted(records)
        assert events.of(RecordUpdated)
        first = [e for e in events.of(InstanceArchived) if e.record_created]
        assert len(first) == len(expected)
    finally:
        engine.stop()


# --- path template ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.3", "1.2.3"),
        ("..", "_.."),
        (".", "_."),
        ("", "_"),
        ("../../etc/passwd", "_._.._etc_passwd"),
        (".hidden", "_hidden"),
        ("a/b\\c\x00d e", "a_b_c_d_e"),
        ("Müller^Jörg", "M_ller_J_rg"),
    ],
)
def test_path_components_are_sanitized(value: str, expected: str) -> None:
    assert sanitize_component(value) == expected


def test_a_template_naming_no_dicom_attribute_is_a_config_error(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    settings = make_settings('[autoloader]\npath_template = "{Nonsense}/{SOPInstanceUID}.dcm"\n')
    with pytest.raises(ConfigError, match=r"path_template.*Nonsense"):
        Autoloader(settings, events)


def test_long_components_are_cut_and_hashed_apart() -> None:
    first, second = "A" * 300, "A" * 299 + "B"
    assert len(sanitize_component(first)) == MAX_COMPONENT_LENGTH
    assert sanitize_component(first) != sanitize_component(second)


def test_hostile_values_cannot_place_files_outside_the_archive(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    engine = opened_engine(
        make_settings,
        events,
        '[autoloader]\npath_template = "../{PatientID}/{StudyInstanceUID}/{SeriesDescription}'
        '/{SOPInstanceUID}.dcm"\n',
    )
    incoming = engine.settings.paths.incoming
    hostile = [
        ("../../../../tmp/evil", "..", "/etc/cron.d"),
        ("..", ".", "../" * 30),
        ("a\x00b", "1.2.3", "x" * 400),
        ("/", "", "..\\..\\windows"),
    ]
    try:
        for patient, study, description in hostile:
            make_instance(
                incoming, patient_id=patient, study_uid=study or "1.2", description=description
            )
        engine.process_incoming()
        archive = engine.settings.paths.archive.resolve()
        with db.database.connection_context():
            paths = [row.archive_path for row in db.Instance.select()]
        assert len(paths) == len(hostile)
        assert sorted(paths) == archive_files(archive)
        for relative in paths:
            parts = Path(relative).parts
            assert ".." not in parts and "." not in parts and not Path(relative).is_absolute()
            assert all(len(part) <= MAX_COMPONENT_LENGTH and part[0] != "." for part in parts)
            assert (archive / relative).resolve().is_relative_to(archive)
        assert not list(engine.settings.paths.data_dir.parent.glob("tmp"))
    finally:
        engine.stop()


# --- duplicates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "differs", "quarantined", "action", "kept"),
    [
        ("keep-first", False, None, "dropped identical copy", "first"),
        ("keep-first", True, "duplicate-conflict", "quarantined", "first"),
        ("overwrite", False, None, "dropped identical copy", "first"),
        ("overwrite", True, None, "overwritten", "second"),
        ("reject", False, "duplicate-rejected", "quarantined", "first"),
        ("reject", True, "duplicate-rejected", "quarantined", "first"),
    ],
)
def test_duplicate_policy(
    make_settings: SettingsFactory,
    events: EventRecorder,
    policy: str,
    differs: bool,
    quarantined: str | None,
    action: str,
    kept: str,
) -> None:
    engine = opened_engine(make_settings, events, f'[autoloader]\nduplicate_policy = "{policy}"\n')
    incoming = engine.settings.paths.incoming
    sop, study, series = (generate_uid(UID_ROOT) for _ in range(3))
    common = {"sop_uid": sop, "study_uid": study, "series_uid": series}
    try:
        make_instance(incoming, description="first", **common)
        engine.process_incoming()
        make_instance(incoming, description="second" if differs else "first", **common)
        engine.process_incoming()
        with db.database.connection_context():
            rows = list(db.Instance.select())
            entries = list(db.QuarantineEntry.select())
        assert len(rows) == 1
        assert archive_files(engine.settings.paths.archive) == [rows[0].archive_path]
        stored = dcmread(engine.settings.paths.archive / rows[0].archive_path)
        assert stored.SeriesDescription == kept
        assert [e.action for e in events.of(InstanceDuplicate)] == [action]
        assert [e.reason for e in entries] == ([quarantined] if quarantined else [])
        assert not list(incoming.iterdir())
    finally:
        engine.stop()


def test_duplicates_within_one_batch_are_resolved_too(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    engine = opened_engine(make_settings, events)
    incoming = engine.settings.paths.incoming
    common = {"sop_uid": generate_uid(UID_ROOT), "study_uid": generate_uid(UID_ROOT)}
    try:
        make_instance(incoming, series_uid="1.2.3", **common)
        make_instance(incoming, series_uid="1.2.3", **common)
        make_instance(incoming, series_uid="1.2.3", description="other", **common)
        engine.process_incoming()
        with db.database.connection_context():
            assert db.Instance.select().count() == 1
            assert [e.reason for e in db.QuarantineEntry.select()] == ["duplicate-conflict"]
        assert len(archive_files(engine.settings.paths.archive)) == 1
    finally:
        engine.stop()


# --- quarantine ---------------------------------------------------------------------------


def test_unprocessable_files_are_quarantined_with_a_sidecar(
    make_settings: SettingsFactory, events: EventRecorder, tmp_path: Path
) -> None:
    engine = opened_engine(make_settings, events)
    incoming = engine.settings.paths.incoming
    quarantine = engine.settings.paths.quarantine
    try:
        text = incoming / "notes.txt"
        text.write_text("not an image")
        _age(text, 60)  # a non-atomic name is read only once it has settled
        big = make_instance(tmp_path, size=512, calling_ae="MODALITY1")
        cut_big = incoming / incoming_name()
        cut_big.write_bytes(big.read_bytes()[:-1000])  # cut inside (deferred) pixel data
        small = make_instance(tmp_path, size=16)
        cut_small = incoming / incoming_name()
        cut_small.write_bytes(small.read_bytes()[:-10])  # cut inside (loaded) pixel data
        header_only = incoming / incoming_name()
        header_only.write_bytes(small.read_bytes()[: small.stat().st_size - 16 * 16 * 2 - 12])
        no_uid = make_instance(incoming, calling_ae="MODALITY2")
        ds = dcmread(no_uid)
        del ds.SeriesInstanceUID
        ds.save_as(no_uid)
        originals = {p.name: p.read_bytes() for p in incoming.iterdir()}

        engine.process_incoming()

        expected = {
            text.name: "not-dicom",
            cut_big.name: "truncated",
            cut_small.name: "truncated",
            header_only.name: "truncated",
            no_uid.name: "missing-uid",
        }
        with db.database.connection_context():
            entries = {Path(e.path).name: e for e in db.QuarantineEntry.select()}
            assert db.Instance.select().count() == 0
        assert {name: e.reason for name, e in entries.items()} == expected
        for name, reason in expected.items():
            stored = quarantine / reason / name
            assert stored.read_bytes() == originals[name]  # never altered
            sidecar = json.loads(Path(str(stored) + ".json").read_text())
            assert sidecar["reason"] == reason and sidecar["detail"]
            assert sidecar["original_name"] == name and sidecar["when"]
        assert entries[cut_big.name].source == "MODALITY1"
        assert entries[no_uid.name].source == "MODALITY2"
        assert "SeriesInstanceUID" in entries[no_uid.name].detail
        assert not list(incoming.iterdir())
        assert len(events.of(InstanceQuarantined)) == len(expected)
    finally:
        engine.stop()


def test_a_file_still_being_copied_in_waits_until_it_settles(
    make_settings: SettingsFactory, events: EventRecorder, tmp_path: Path
) -> None:
    engine = opened_engine(make_settings, events)
    try:
        source = make_instance(tmp_path)
        copying = engine.settings.paths.incoming / "IMG0001"
        shutil.copyfile(source, copying)
        engine.process_incoming()
        assert copying.exists()  # fresh and not named by our atomic writers: not touched yet
        _age(copying, 60)
        engine.process_incoming()
        assert not copying.exists()
        with db.database.connection_context():
            assert db.Instance.select().count() == 1
    finally:
        engine.stop()


class _RefusingAnonymizer:
    """Refuses ultrasound, renames everyone else: stands in for the rule engine."""

    def anonymize(self, dataset: Dataset) -> AnonymizationResult:
        if dataset.Modality == "US":
            raise AnonymizationRefused("burned-in", "ultrasound may carry burned-in text")
        dataset.PatientName = "ANON"
        return AnonymizationResult(dataset=dataset, ruleset_version=7)


def test_the_anonymizer_decides_what_is_archived(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    engine = opened_engine(make_settings, events)
    engine.anonymizer = _RefusingAnonymizer()
    incoming = engine.settings.paths.incoming
    try:
        kept = make_instance(incoming, size=512)
        make_instance(incoming, modality="US")
        original = dcmread(kept)
        engine.process_incoming()
        with db.database.connection_context():
            row = db.Instance.get()
            assert row.ruleset_version == 7
            assert db.Patient.get().patient_name == "ANON"
            assert [e.reason for e in db.QuarantineEntry.select()] == ["burned-in"]
        stored = dcmread(engine.settings.paths.archive / row.archive_path)
        assert stored.PatientName == "ANON"
        assert stored.PixelData == original.PixelData
        assert list((engine.settings.paths.quarantine / "burned-in").glob("*.json"))
    finally:
        engine.stop()


def test_keep_originals_keeps_the_received_file(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    engine = opened_engine(make_settings, events, "[autoloader]\nkeep_originals = true\n")
    engine.anonymizer = _RefusingAnonymizer()
    try:
        source = make_instance(engine.settings.paths.incoming)
        received = source.read_bytes()
        engine.process_incoming()
        with db.database.connection_context():
            relative = db.Instance.get().archive_path
        assert (engine.settings.paths.originals / relative).read_bytes() == received
        assert dcmread(engine.settings.paths.archive / relative).PatientName == "ANON"
    finally:
        engine.stop()


# --- reconciling and crash leftovers -----------------------------------------------------


def test_startup_reconciles_archive_and_index(
    make_settings: SettingsFactory, events: EventRecorder, tmp_path: Path
) -> None:
    engine = opened_engine(make_settings, events)
    paths = engine.settings.paths
    try:
        for _ in range(3):
            make_instance(paths.incoming)
        engine.process_incoming()
        with db.database.connection_context():
            rows = list(db.Instance.select().order_by(db.Instance.id))
        # A lost file, an old orphan (indexed in place), a fresh orphan (maybe another node's
        # commit in flight: left alone), a stale temporary file.
        (paths.archive / rows[0].archive_path).unlink()
        old_orphan = paths.archive / "adopted" / "old.dcm"
        old_orphan.parent.mkdir()
        shutil.move(make_instance(tmp_path), old_orphan)
        _age(old_orphan, ORPHAN_MIN_AGE_SECONDS + 60)
        young_orphan = paths.archive / "adopted" / "young.dcm"
        shutil.move(make_instance(tmp_path), young_orphan)
        autoloader = Autoloader(engine.settings, events)
        stale = autoloader.temp_folder / "leftover.part"
        stale.write_bytes(b"half")
        autoloader.clean_marker.unlink(missing_ok=True)  # as after a kill

        autoloader.run_once()

        with db.database.connection_context():
            now = {row.archive_path: row for row in db.Instance.select()}
            record = db.Record.get(db.Record.key == rows[1].record.key)
        assert rows[0].archive_path not in now
        assert "adopted/old.dcm" in now and "adopted/young.dcm" not in now
        assert young_orphan.exists()
        assert not stale.exists()
        assert record.instance_count == 1
    finally:
        engine.stop()


def test_a_file_archived_just_before_a_kill_is_not_counted_twice(
    make_settings: SettingsFactory, events: EventRecorder, tmp_path: Path
) -> None:
    """Killed after the commit, before incoming/ was cleaned: the journal names the file."""
    engine = opened_engine(make_settings, events, '[autoloader]\nduplicate_policy = "reject"\n')
    paths = engine.settings.paths
    try:
        source = make_instance(tmp_path)
        leftover = paths.incoming / incoming_name()
        shutil.copyfile(source, leftover)
        engine.process_incoming()
        shutil.copyfile(source, leftover)  # the state a kill after the commit leaves
        autoloader = Autoloader(engine.settings, events)
        autoloader.journal.write_text(leftover.name)
        autoloader.clean_marker.unlink(missing_ok=True)
        autoloader.run_once()
        with db.database.connection_context():
            assert db.Instance.select().count() == 1
            assert db.QuarantineEntry.select().count() == 0
        assert not leftover.exists()
        assert not events.of(InstanceDuplicate)
        assert len(archive_files(paths.archive)) == 1
    finally:
        engine.stop()


def test_the_running_engine_picks_up_files_dropped_into_incoming(
    engine: Engine, events: EventRecorder, tmp_path: Path
) -> None:
    source = make_instance(tmp_path)
    os.replace(source, engine.settings.paths.incoming / source.name)
    archived = events.wait_for(InstanceArchived, timeout=30)
    assert archived[0].archive_path.endswith(".dcm")


def test_only_one_autoloader_per_data_folder(engine: Engine, events: EventRecorder) -> None:
    with pytest.raises(AutoloaderBusy):
        Autoloader(engine.settings, events).run_once()
