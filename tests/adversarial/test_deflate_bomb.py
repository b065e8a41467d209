"""A deflated data set that inflates to gigabytes: quarantined unread, memory flat.

pydicom inflates a Deflated Explicit VR Little Endian data set whole before parsing it, whatever
``defer_size`` says, so a file of about a megabyte (deflate compresses zeros about 1000:1) would
take gigabytes of memory in the autoloader. The autoloader inflates such files in a stream first,
keeping nothing, and refuses the ones over ``MAX_INFLATED_BYTES``.
"""

from __future__ import annotations

import resource
import zlib
from pathlib import Path

import pydicom.data
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from webaims_tui.engine.autoloader import MAX_INFLATED_BYTES, Autoloader, deflate_bomb_problem
from webaims_tui.engine.service import Engine

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
#: pydicom's own deflated image: a real file that must pass.
DEFLATED = TEST_FILES / "image_dfl.dcm"
CT_SMALL = TEST_FILES / "CT_small.dcm"
_CHUNK = 16 * 1024 * 1024


def write_deflated_ct(path: Path, inflated_pixel_bytes: int) -> str:
    """CT_small's header, then that many bytes of zero pixel data, deflated in a stream.

    Returns the SOP Instance UID.
    """
    ds = dcmread(CT_SMALL, stop_before_pixels=True)
    ds.SOPInstanceUID = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_file_meta_info(header, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    # (7FE0,0010) OW with a 32-bit length: the value follows as zeros.
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + inflated_pixel_bytes.to_bytes(4, "little")
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(_CHUNK)
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM" + header.getvalue())
        handle.write(deflater.compress(body.getvalue() + pixel_header))
        remaining = inflated_pixel_bytes
        while remaining:
            step = min(remaining, _CHUNK)
            handle.write(deflater.compress(zeros[:step]))
            remaining -= step
        handle.write(deflater.flush())
    return str(ds.SOPInstanceUID)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_deflate_bomb_is_quarantined_unread_and_memory_stays_flat(
    make_settings: SettingsFactory, events: EventRecorder, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    bomb = media / "bomb.dcm"
    # Just over the limit, and even: a DICOM value length is.
    write_deflated_ct(bomb, MAX_INFLATED_BYTES + 2)
    assert bomb.stat().st_size < 8 * 1024 * 1024  # a few MB on the wire
    # A deflated CT of its real size (128 x 128 x 16 bits) goes through to the archive.
    write_deflated_ct(media / "control.dcm", 128 * 128 * 2)
    crafted = bomb.read_bytes()
    settings = make_settings()
    engine = Engine(settings, sink=events)
    try:
        assert engine.import_paths([media]).imported == 2
        before = _peak_rss_mb()
        autoloader = Autoloader(settings, events, engine.make_anonymizer(), processes=0)
        counters = autoloader.run_once()
        # Inflating it would have raised this process's peak by a gigabyte.
        assert _peak_rss_mb() - before < 256
        assert (counters.archived, counters.quarantined) == (1, 1)
        [entry] = engine.quarantine_entries("decompression-bomb")
        assert f"inflates to more than {MAX_INFLATED_BYTES:,} bytes" in entry.detail
        [kept] = (settings.paths.quarantine / "decompression-bomb").glob("*.dcm")
        assert kept.read_bytes() == crafted  # quarantined as it arrived
    finally:
        engine.stop()


def test_real_deflated_files_pass_and_the_limit_is_the_inflated_size(tmp_path: Path) -> None:
    assert deflate_bomb_problem(DEFLATED) is None
    # image_dfl.dcm inflates to about 262 KB: over a 100 KB limit, under a 1 MB one.
    assert deflate_bomb_problem(DEFLATED, limit=100 * 1024) is not None
    assert deflate_bomb_problem(DEFLATED, limit=1024 * 1024) is None
    small = tmp_path / "small.dcm"
    write_deflated_ct(small, 2 * 1024 * 1024)
    assert dcmread(small).Rows == 128  # the crafted file is valid DICOM
    assert deflate_bomb_problem(small, limit=1024 * 1024) is not None
    assert deflate_bomb_problem(small, limit=4 * 1024 * 1024) is None
    # Not deflated: never inflated, whatever the limit.
    assert deflate_bomb_problem(CT_SMALL, limit=1) is None
