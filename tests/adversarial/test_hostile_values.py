"""UIDs and Patient IDs that try to choose a path: nothing is written outside its folder.

Crafted values (``..``, ``/``, NUL, over-long, absolute paths) arrive through the SCP (raw
protocol: pynetdicom's SCU would refuse to send such UIDs) and through ``webaims-tui import``;
the archive and quarantine are then searched, and so are the places an unsanitized path join
would have reached.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from tests.adversarial.conftest import EngineFactory, port_of
from tests.adversarial.fuzzing import REQUEST, command, pdv
from tests.adversarial.peers import PDU_ASSOCIATE_AC, make_instance, read_pdu
from tests.helpers import EventRecorder
from webaims_tui.engine.events import (
    EngineEvent,
    InstanceArchived,
    InstanceQuarantined,
    InstanceReceived,
)


def _hostile_instance(tag: str) -> Dataset:
    ds = make_instance(1000)
    ds.SOPInstanceUID = f"../../../../escape-{tag}-instance"
    ds.StudyInstanceUID = f"/tmp/escape-{tag}-study"
    ds.SeriesInstanceUID = "1.2\x00/../.."
    ds.PatientID = f"../../escape-{tag}-patient/" + "A" * 300
    ds.PatientName = f"..^/escape-{tag}"
    return ds


def _escaped(data_dir: Path, tag: str) -> list[Path]:
    """Paths named after the hostile values that are not inside archive/ or quarantine/."""
    allowed = [(data_dir / folder).resolve() for folder in ("archive", "quarantine", "originals")]
    outside = [Path(f"/tmp/escape-{tag}-study")]
    for base in (Path("/tmp"), data_dir.parent, data_dir.parent.parent):
        outside += base.glob(f"*escape-{tag}*")
    found = [path for path in outside if path.exists()]
    for path in data_dir.rglob(f"*escape-{tag}*"):
        if not any(path.resolve().is_relative_to(folder) for folder in allowed):
            found.append(path)
    return found


def _store_raw(port: int, ds: Dataset) -> None:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = str(SecondaryCaptureImageStorage)
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = ds.SOPInstanceUID
    data = encode(ds, True, True)
    assert data is not None
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(REQUEST)
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == PDU_ASSOCIATE_AC
        # Context 3 is Secondary Capture in REQUEST.
        sock.sendall(pdv(3, 0x03, command(cmd)) + pdv(3, 0x02, data))
        response = read_pdu(sock)
        assert response is not None and response[0] == 0x04
        sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        read_pdu(sock)


def test_hostile_values_through_the_scp_stay_inside_the_archive(
    start_engine: EngineFactory, events: EventRecorder
) -> None:
    engine = start_engine()
    tag = uuid.uuid4().hex[:8]
    _store_raw(port_of(engine), _hostile_instance(tag))
    received = events.wait_for(InstanceReceived)[0]
    # The SCP never names a file after a UID.
    assert "escape" not in received.incoming_name
    outcome = events.wait_for(
        EngineEvent,
        timeout=60,
        where=lambda e: isinstance(e, InstanceArchived | InstanceQuarantined),
    )[0]
    assert outcome  # archived (names sanitized) or quarantined: either way, inside
    data_dir = engine.settings.paths.data_dir
    assert not _escaped(data_dir, tag)


def test_hostile_values_through_import_stay_inside_the_archive(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    ds = _hostile_instance(tag)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    source = tmp_path / "media"
    source.mkdir()
    dcmwrite(source / "hostile.dcm", ds, enforce_file_format=True)
    config = tmp_path / "config.toml"
    config.write_text("")
    data_dir = tmp_path / "data"
    isolated = {"XDG_CONFIG_HOME": str(tmp_path / "x1"), "XDG_DATA_HOME": str(tmp_path / "x2")}
    result = subprocess.run(
        [sys.executable, "-m", "webaims_tui", "--config", str(config), "--data-dir",
         str(data_dir), "import", "--quiet", str(source)],
        env={**os.environ, **isolated}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not _escaped(data_dir, tag)
    archived = list((data_dir / "archive").rglob("*.dcm")) + list(
        (data_dir / "quarantine").rglob("*.dcm")
    )
    assert archived, "the file was neither archived nor quarantined"
    for path in archived:
        assert data_dir.resolve() in path.resolve().parents


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
