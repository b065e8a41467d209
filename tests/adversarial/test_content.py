"""Content checks in the SCP: the data set must carry the UIDs the C-STORE request names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode, encode_file_meta
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage

from tests.adversarial.conftest import EngineFactory, port_of
from tests.adversarial.peers import make_instance
from tests.helpers import EventRecorder
from webaims_tui.engine.events import InstanceReceived, StoreFailed
from webaims_tui.engine.store_checks import data_set_uids


def _file_with_meta(
    path: Path, data_set: bytes, sop_class: str, sop_instance: str, syntax: str
) -> Path:
    """A Part 10 file whose file meta names ``sop_class``/``sop_instance`` whatever follows.

    pynetdicom sends a file given by path as is: the request's UIDs come from the file meta and
    the data set bytes are not re-encoded (with STORE_SEND_CHUNKED_DATASET), exactly what a
    broken modality would put on the wire.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.9999.1"
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + data_set)
    return path


def _encoded(ds: Dataset) -> bytes:
    """The data set part of ``ds`` encoded in Explicit VR Little Endian."""
    encoded = encode(ds, False, True)
    assert encoded is not None
    return encoded


def _store(port: int, path: Path) -> int:
    ae = AE(ae_title="BROKEN")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="WEBAIMS")
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    return int(status.Status)


CASES: dict[str, tuple[int, tuple[str, ...]]] = {
    "instance UID differs": (0xA900, ("SOP Instance UID differs",)),
    "class UID differs": (0xA900, ("SOP Class UID differs",)),
    "instance UID missing": (0xC000, ("no SOP Instance UID",)),
    "class UID missing": (0xC000, ("no SOP Class UID",)),
    # Garbage reads as "no UIDs" or "cannot be parsed" depending on the bytes: both 0xC000.
    "garbage data set": (0xC000, ("no SOP", "cannot be parsed")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inconsistent_data_sets_are_refused_and_nothing_is_written(
    start_engine: EngineFactory,
    events: EventRecorder,
    tmp_path: Path,
    case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Send files as stored: request UIDs from the file meta, data set bytes untouched.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    engine = start_engine()
    ds = make_instance(1000)
    sop_class, sop_instance = str(SecondaryCaptureImageStorage), str(ds.SOPInstanceUID)
    if case == "instance UID differs":
        sop_instance = generate_uid()
    elif case == "class UID differs":
        sop_class = str(CTImageStorage)
    elif case == "instance UID missing":
        del ds.SOPInstanceUID
    elif case == "class UID missing":
        del ds.SOPClassUID
    data_set = _encoded(ds)
    if case == "garbage data set":
        # A tag of group 0008 with a length running far past the end of the data.
        data_set = b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 16
    path = _file_with_meta(
        tmp_path / "sent.dcm", data_set, sop_class, sop_instance, ExplicitVRLittleEndian
    )
    expected_status, expected_reasons = CASES[case]
    assert _store(port_of(engine), path) == expected_status
    failed = events.wait_for(StoreFailed)[0]
    assert any(reason in failed.reason for reason in expected_reasons), failed.reason
    assert not events.of(InstanceReceived)
    assert not list(engine.settings.paths.incoming.iterdir())
    assert not list(engine.settings.paths.spool.iterdir())


def test_a_consistent_data_set_in_every_syntax_passes_the_header_parse(
    corpus: list[Path],
) -> None:
    """The cheap header parse reads the UIDs of every corpus file, whatever its syntax."""
    from pydicom import dcmread

    for path in corpus:
        ds = dcmread(path, stop_before_pixels=True)
        raw = path.read_bytes()
        syntax = str(ds.file_meta.TransferSyntaxUID)
        # The data set starts right after the file meta group.
        start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        assert data_set_uids(raw[start:], syntax) == (
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
        ), path.name
