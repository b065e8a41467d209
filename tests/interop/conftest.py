"""A real Orthanc (Debian package) as the remote PACS for the Query/Retrieve tests.

One Orthanc per test worker (session scope): started on free loopback ports with temporary
storage and index folders, no plugins, and filled once through its REST API with pydicom's
storage corpus plus generated studies whose keys the C-FIND tests match on. Each test that
retrieves into an engine tells Orthanc where that engine listens (``PUT /modalities/webaims``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests.helpers import storage_corpus
from webaims_tui.engine.qr import Peer

if TYPE_CHECKING:
    from webaims_tui.engine.service import Engine

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_AE = "ORTHANC"
UID_PREFIX = "1.2.826.0.1.3680043.10.1234."


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- generated studies ------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedSeries:
    uid: str
    modality: str
    instances: tuple[str, ...]


@dataclass(frozen=True)
class GeneratedStudy:
    patient_id: str
    patient_name: str
    birth_date: str
    uid: str
    date: str
    accession: str
    description: str
    series: tuple[GeneratedSeries, ...]

    @property
    def instances(self) -> list[str]:
        return [uid for s in self.series for uid in s.instances]


#: (patient ID, name, birth date, study date, accession, description, [(modality, count)])
STUDY_PLAN = [
    ("QRP001", "QR^ALPHA", "19600101", "20240115", "ACC001", "CHEST CT", [("CT", 3), ("CT", 2)]),
    ("QRP001", "QR^ALPHA", "19600101", "20240620", "ACC002", "BRAIN MR", [("MR", 4)]),
    ("QRP002", "QR^BETA", "19751231", "20230301", "ACC003", "ABDOMEN", [("CT", 2), ("MR", 3)]),
    ("QRP003", "OTHER^GAMMA", "19900505", "20220101", "ACC004", "LARGE SERIES", [("CT", 200)]),
]


def make_instance(
    study: GeneratedStudy, series: GeneratedSeries, number: int, sop_uid: str
) -> bytes:
    """A small, valid CT or MR image (8x8 pixels) as Part 10 bytes."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if series.modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    ds.StudyTime = "101500"
    ds.AccessionNumber = study.accession
    ds.StudyDescription = study.description
    ds.StudyID = study.accession[-3:]
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = 1 + [s.uid for s in study.series].index(series.uid)
    ds.Modality = series.modality
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(64, dtype="<u2") * number).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def generated_studies() -> list[GeneratedStudy]:
    studies = []
    for index, (pid, name, birth, date, accession, description, plan) in enumerate(STUDY_PLAN):
        series = tuple(
            GeneratedSeries(
                uid=generate_uid(UID_PREFIX, [f"series-{index}-{n}"]),
                modality=modality,
                instances=tuple(
                    generate_uid(UID_PREFIX, [f"image-{index}-{n}-{i}"]) for i in range(count)
                ),
            )
            for n, (modality, count) in enumerate(plan)
        )
        studies.append(
            GeneratedStudy(
                patient_id=pid,
                patient_name=name,
                birth_date=birth,
                uid=generate_uid(UID_PREFIX, [f"study-{index}"]),
                date=date,
                accession=accession,
                description=description,
                series=series,
            )
        )
    return studies


# --- Orthanc --------------------------------------------------------------------------------


@dataclass
class Orthanc:
    """A running Orthanc and a small REST client for it."""

    dicom_port: int
    http_port: int
    folder: Path
    process: subprocess.Popen[bytes]
    studies: list[GeneratedStudy] = field(default_factory=list)
    corpus_instances: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, method: str, path: str, body: bytes | dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def rest_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return self.rest("GET", path)

    def store(self, data: bytes) -> str:
        """POST /instances; returns the SOP Instance UID Orthanc stored."""
        answer = self.rest("POST", "/instances", data)
        return str(self.get(f"/instances/{answer['ID']}")["MainDicomTags"]["SOPInstanceUID"])

    def knows(self, ae_title: str, port: int, name: str = "webaims") -> None:
        """Tell Orthanc where a move destination listens (what a PACS admin would configure)."""
        self.rest(
            "PUT", f"/modalities/{name}", {"AET": ae_title, "Host": "127.0.0.1", "Port": port}
        )

    def forget(self, name: str = "webaims") -> None:
        with contextlib.suppress(urllib.error.HTTPError):
            self.rest("DELETE", f"/modalities/{name}")

    def main_tags(self, level: str) -> list[dict[str, str]]:
        """MainDicomTags of every resource at a level (patients, studies, series, instances)."""
        return [item["MainDicomTags"] for item in self.get(f"/{level}?expand")]

    def peer(self, **changes: Any) -> Peer:
        values: dict[str, Any] = {
            "name": "orthanc",
            "ae_title": ORTHANC_AE,
            "host": "127.0.0.1",
            "port": self.dicom_port,
            "acse_timeout": 10.0,
            "dimse_timeout": 30.0,
            "network_timeout": 30.0,
            **changes,
        }
        return Peer(**values)


def _start_orthanc(folder: Path) -> Orthanc:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "webaims-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "Plugins": [],
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        # Lets the tests provoke "called AE title not recognised".
        "DicomCheckCalledAet": True,
        "DicomModalities": {},
        # The tests run on loopback: fail fast when a destination does not answer.
        "DicomScuTimeout": 5,
        "StorageCompression": False,
        "HttpCompressionEnabled": False,
    }
    config_file = folder / "orthanc.json"
    config_file.write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("wb")
    # Without TCP_NODELAY this DCMTK-based build waits for a delayed ACK on every message.
    process = subprocess.Popen(
        [ORTHANC, str(config_file)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    orthanc = Orthanc(dicom_port=dicom_port, http_port=http_port, folder=folder, process=process)
    deadline = time.monotonic() + 30
    while True:
        try:
            orthanc.get("/system")
            return orthanc
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc filled with the pydicom corpus and the generated studies."""
    if not Path(ORTHANC).exists():
        pytest.skip("Orthanc is not installed")
    folder = tmp_path_factory.mktemp("orthanc")
    server = _start_orthanc(folder)
    try:
        for path in storage_corpus():
            # Orthanc may refuse an odd file; the tests compare with what it holds.
            with contextlib.suppress(urllib.error.HTTPError):
                server.corpus_instances.append(server.store(path.read_bytes()))
        server.studies = generated_studies()
        for study in server.studies:
            for series in study.series:
                for number, uid in enumerate(series.instances, start=1):
                    server.store(make_instance(study, series, number, uid))
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()


@pytest.fixture
def orthanc_knows_engine(orthanc: Orthanc, engine: Engine) -> Iterator[Orthanc]:
    """Orthanc with our running engine configured as the move destination ``webaims``."""
    assert engine.server is not None and engine.server.listening
    orthanc.knows(engine.settings.server.ae_title, engine.server.port)
    yield orthanc
    orthanc.forget()


def read_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
