"""DCMTK's echoscu and storescu (Debian package) against our Storage SCP."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRBigEndian

from tests.helpers import EventRecorder, storage_corpus
from webaims_tui.engine.events import InstanceReceived
from webaims_tui.engine.service import Engine

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed"),
]

# Without TCP_NODELAY this DCMTK build waits ~40 ms for a delayed ACK on every message.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _port(engine: Engine) -> int:
    assert engine.server is not None
    return engine.server.port


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=DCMTK_ENV, capture_output=True, text=True, timeout=120)


def test_echoscu(receiver: Engine) -> None:
    result = _run(
        "echoscu", "-aet", "DCMTKSCU", "-aec", "WEBAIMS", "127.0.0.1", str(_port(receiver))
    )
    assert result.returncode == 0, result.stderr


#: storescu proposes uncompressed syntaxes unless told which compressed one to add.
STORESCU_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated
    "1.2.840.10008.1.2.1": "-xe",  # explicit little endian first
    "1.2.840.10008.1.2.2": "-xb",  # explicit big endian first
    "1.2.840.10008.1.2": "-xi",  # implicit little endian only
}


def _same(stored: Dataset, sent: Dataset, tag: BaseTag) -> bool:
    a, b = stored[tag].value, sent[tag].value
    if a in (None, "", b"") and b in (None, "", b""):
        return True  # an empty value read back under implicit VR has no VR to say it is ''
    return bool(a == b)


def _as_little_endian(path: Path, folder: Path) -> Dataset:
    """The file converted by DCMTK to Explicit VR Little Endian (uncompressed input only).

    Byte order changes swap OW words and may turn OB into OW; converting sent and received
    files with the same tool makes their values comparable element by element.
    """
    target = folder / f"{path.name}-{len(list(folder.iterdir()))}.dcm"
    subprocess.run(["dcmconv", "+te", str(path), str(target)], check=True, capture_output=True)
    return dcmread(target)


def _dcmtk_can_read(path: Path) -> bool:
    """A few of pydicom's test files are deliberately odd; DCMTK's own parser decides."""
    return subprocess.run(["dcmdump", "-q", str(path)], capture_output=True).returncode == 0


def _syntax(path: Path) -> UID:
    return UID(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _send_groups(mode: str, folder: Path) -> list[tuple[list[str], list[Path]]]:
    """(storescu options, files) pairs: as stored, or all uncompressed in one forced syntax.

    storescu sends a file in its own syntax when that context is accepted, so forcing a syntax
    means converting the files to it first (dcmconv), then proposing it first.
    """
    files = [p for p in storage_corpus(encodable=False) if _dcmtk_can_read(p)]
    if mode == "as-stored":
        groups: dict[str, list[Path]] = {}
        for path in files:
            syntax = _syntax(path)
            if syntax in STORESCU_OPTION:  # else storescu cannot be told to propose it
                groups.setdefault(STORESCU_OPTION[syntax], []).append(path)
        return [(["-R", option], group) for option, group in sorted(groups.items())]
    option, conversion = {
        "explicit-big-endian": ("-xb", "+tb"),
        "implicit-little-endian": ("-xi", "+ti"),
    }[mode]
    converted = []
    for index, path in enumerate(p for p in files if not _syntax(p).is_compressed):
        target = folder / f"forced-{index}.dcm"
        subprocess.run(["dcmconv", conversion, str(path), str(target)], check=True)
        converted.append(target)
    return [(["-R", option], converted)]


@pytest.mark.parametrize(
    ("mode", "expected_syntax"),
    [
        ("as-stored", None),
        ("explicit-big-endian", "1.2.840.10008.1.2.2"),
        ("implicit-little-endian", "1.2.840.10008.1.2"),
    ],
)
def test_storescu_sends_the_corpus_and_every_element_arrives_equal(
    receiver: Engine,
    events: EventRecorder,
    mode: str,
    expected_syntax: str | None,
    tmp_path: Path,
) -> None:
    sent_files: list[Path] = []
    for options, files in _send_groups(mode, tmp_path):
        command = ["storescu", "-nh", "-aet", "DCMTKSCU", "-aec", "WEBAIMS", *options]
        result = _run(*command, "127.0.0.1", str(_port(receiver)), *map(str, files))
        assert result.returncode == 0, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("E:")]
        assert not errors, errors
        sent_files += files
    assert len(sent_files) > 80

    received = events.wait_for(InstanceReceived, count=len(sent_files))
    by_uid = {e.sop_instance_uid: e for e in received}
    incoming = receiver.settings.paths.incoming
    for path in sent_files:
        sent = dcmread(path)
        event = by_uid[str(sent.SOPInstanceUID)]
        stored = dcmread(incoming / event.incoming_name)
        syntax = stored.file_meta.TransferSyntaxUID
        assert syntax == (expected_syntax or sent.file_meta.TransferSyntaxUID), path.name
        if {syntax, sent.file_meta.TransferSyntaxUID} & {ExplicitVRBigEndian}:
            stored = _as_little_endian(incoming / event.incoming_name, tmp_path)
            sent = _as_little_endian(path, tmp_path)
        assert "PixelData" in stored or "PixelData" not in sent
        for element in sent:
            if element.tag.element == 0 or element.tag == 0xFFFCFFFC:
                # Group lengths (retired) and trailing padding carry no data; DCMTK drops them.
                continue
            assert element.tag in stored, f"{path.name}: {element.tag} missing"
            if stored[element.tag].VR == "UN" and element.tag.is_private:
                continue  # implicit VR carries no VR for private data: same bytes, no meaning
            assert _same(stored, sent, element.tag), f"{path.name}: {element.tag} differs"
