"""A pre-filled archive for UI tests: real pydicom files copied into archive/, rows in the database.

The rows are what the autoloader writes (one Patient/Study/Series/Instance row per real file,
``archive_path`` relative to ``settings.paths.archive``) but with fixed values, so snapshots and
row-order assertions are deterministic and a test needs no network round trip. The end-to-end
browser test in test_browser.py fills its archive through the real SCP and autoloader instead.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pydicom.data
from pydicom import dcmread

from webaims_tui.config import Settings, ensure_folders
from webaims_tui.engine import db

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
FIXED_TIME = datetime(2026, 12, 1, 9, 30, 0)


@dataclass
class FilledArchive:
    patients: dict[str, int] = field(default_factory=dict)
    studies: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


#: (patient id, name, sex, birth, study date, study description, accession, series no, modality,
#:  series description, test file)
LAYOUT = [
    (
        "ANON0001",
        "ANON^ALPHA",
        "F",
        "19700101",
        "20240115",
        "CT HEAD",
        "ACC001",
        1,
        "CT",
        "AXIAL 5MM",
        "CT_small.dcm",
    ),
    (
        "ANON0001",
        "ANON^ALPHA",
        "F",
        "19700101",
        "20240115",
        "CT HEAD",
        "ACC001",
        2,
        "CT",
        "RECON",
        "liver_1frame.dcm",
    ),
    (
        "ANON0002",
        "ANON^BRAVO",
        "M",
        "19650505",
        "20231102",
        "MR KNEE",
        "ACC002",
        1,
        "MR",
        "T1 SAG",
        "MR_small.dcm",
    ),
    (
        "ANON0003",
        "ANON^CHARLIE",
        "O",
        "19800808",
        "20220630",
        "RT PLAN",
        "ACC003",
        1,
        "RTDOSE",
        "DOSE",
        "rtdose.dcm",
    ),
    (
        "ANON0003",
        "ANON^CHARLIE",
        "O",
        "19800808",
        "20220630",
        "RT PLAN",
        "ACC003",
        2,
        "RTPLAN",
        "PLAN",
        "rtplan.dcm",
    ),
]


def fill_archive(
    settings: Settings, layout: list[tuple[object, ...]] | None = None
) -> FilledArchive:
    """Copy the layout's files into the archive and index them; leaves the database closed."""
    ensure_folders(settings)
    database = db.open_database(settings.paths.database_url)
    filled = FilledArchive()
    try:
        with database.atomic():
            record = db.Record.create(
                unit="study",
                key="REC-0001",
                first_received=FIXED_TIME,
                last_received=FIXED_TIME,
                last_modified=FIXED_TIME,
            )
            for row in layout or LAYOUT:
                (
                    patient_id,
                    name,
                    sex,
                    birth,
                    date,
                    study_desc,
                    accession,
                    series_number,
                    modality,
                    series_desc,
                    file_name,
                ) = row
                source = TEST_FILES / str(file_name)
                ds = dcmread(source, stop_before_pixels=True)
                patient = filled.patients.get(str(patient_id))
                if patient is None:
                    patient = db.Patient.create(
                        patient_id=patient_id,
                        patient_name=name,
                        sex=sex,
                        birth_date=birth,
                        created_at=FIXED_TIME,
                    ).id
                    filled.patients[str(patient_id)] = patient
                study_key = f"{patient_id}/{study_desc}"
                study = filled.studies.get(study_key)
                if study is None:
                    study = db.Study.create(
                        study_instance_uid=f"1.2.826.0.1.3680043.10.1.{len(filled.studies) + 1}",
                        patient=patient,
                        record=record,
                        study_date=date,
                        study_time="093000",
                        description=study_desc,
                        accession_number=accession,
                        modalities=modality,
                        created_at=FIXED_TIME,
                    ).id
                    filled.studies[study_key] = study
                else:
                    current = db.Study.get_by_id(study).modalities
                    if str(modality) not in current.split("\\"):
                        db.Study.update(modalities=f"{current}\\{modality}").where(
                            db.Study.id == study
                        ).execute()
                series = db.Series.create(
                    series_instance_uid=f"1.2.826.0.1.3680043.10.2.{len(filled.series) + 1}",
                    study=study,
                    record=record,
                    modality=modality,
                    series_number=series_number,
                    description=series_desc,
                    created_at=FIXED_TIME,
                ).id
                filled.series[f"{study_key}/{series_number}"] = series
                relative = f"{patient_id}/{study}/{series}/{file_name}"
                target = settings.paths.archive / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                instance = db.Instance.create(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series=series,
                    record=record,
                    sop_class_uid=str(ds.SOPClassUID),
                    instance_number=1,
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
                    size=target.stat().st_size,
                    received_at=FIXED_TIME,
                    calling_ae="MODALITY1",
                    archive_path=relative,
                ).id
                filled.instances[str(file_name)] = instance
                filled.files[str(file_name)] = target
            count = db.Instance.select().count()
            db.Record.update(instance_count=count, series_count=len(filled.series)).execute()
    finally:
        database.close()
    return filled
